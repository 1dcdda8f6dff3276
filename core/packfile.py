"""A compressed model as one real file, written and loaded without pickle.

The size the lab reports for a compressed model is the length of this file; loading it back gives a model
whose every tensor equals the one written, so its accuracy is the reported one (tests/test_packfile.py).

Layout (docs/packfile.md):

    magic  b"\\x89MCLPACK"  8 bytes
    version                1 byte   (1)
    compressor             1 byte   (0 none, 1 zlib, 2 lzma/xz)
    body length            8 bytes  uint64 little-endian, before compression
    body CRC-32            4 bytes  uint32 little-endian, of the uncompressed body
    compressed body        the rest

    body = uint32 LE header length + JSON header (UTF-8) + blob area (raw little-endian arrays)

The header names the architecture (`build_model(arch, num_classes)`), every state-dict tensor with its shape
and dtype, and how each one is stored in the blob area:

- layout   "dense" (every element), "bitmask" (one bit per element, then the nonzero elements) or "indices"
           (uint16/uint32 flat positions of the nonzero elements, then those elements), whichever is smallest
- values   "raw" in a storage dtype (fp32 weights exactly representable in fp16 are stored as fp16), float
           bytes split into byte planes ("shuffled": the compressor finds the repeated exponent bytes), or
           "codes": signed integer codes on a symmetric grid, bit-packed at `bits` (1-16), plus fp32 scales
           (one per tensor, or one per channel along `axis`), decoded as codes.float() * scale: the very
           operation quant_fake.dequantize performs, so the weights come back bit for bit

A structurally pruned model is rebuilt by building the base architecture and shrinking each layer to the
saved shapes (pruning.shrink_to_state). A model held by ONNX Runtime (real int8) is stored as its ONNX bytes
("kind": "onnx") and loaded as an OrtModule. The header also carries the dataset name, class names and the
input normalization (`meta_for`), the activation quantization ranges of a fake-quantized model, and whatever
else the caller puts in `meta`. Zeros are stored as +0.0: a -0.0 left by masking comes back as +0.0 (equal
values, identical predictions).

Anything wrong with a file (wrong magic, truncated, corrupt compressed stream, a header that does not parse,
shapes or sizes that do not add up) raises CorruptCacheEntry with one line; nothing in it is ever unpickled.
"""
from __future__ import annotations

import json
import lzma
import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import CorruptCacheEntry, LabError

MAGIC = b"\x89MCLPACK"
VERSION = 1
SUFFIX = ".mclpack"
FORMAT = "mclpack"
_OUTER = struct.Struct("<8sBBQI")          # magic, version, compressor, body length, body crc32
COMPRESSORS = {"none": 0, "zlib": 1, "lzma": 2}
DEFAULT_COMPRESSOR = "zlib"                 # measured against lzma in docs/packfile.md
LZMA_PRESET = 6
ZLIB_LEVEL = 6
MAX_BITS = 16
_SAMPLE = 512                               # elements checked before a whole tensor is tried on a grid
_ULPS = 3                                   # scale candidates tried either side of max|w| / qmax

_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


# ----------------------------------------------------------------------------- public API
def meta_for(data, **extra) -> dict:
    """What a packfile records about its data: the dataset name, class names and input normalization
    (of a core.datasets.DataBundle), plus anything in `extra` (JSON values)."""
    return dict({"dataset": data.name, "classes": list(data.classes), "mean": list(data.mean),
                 "std": list(data.std)}, **extra)


def encode(model: nn.Module, arch: str, num_classes: int, meta: dict, bits: dict[str, int] | None = None,
           compressor: str = DEFAULT_COMPRESSOR) -> bytes:
    """The packfile of `model` (an nn.Module of `build_model(arch, num_classes)`, possibly structurally
    pruned, or an OrtModule): bytes to write anywhere.

    bits: None finds conv/linear weights that lie exactly on a symmetric integer grid (any width 1-16, per
    tensor or per channel, as quant_fake makes them) and stores their codes; {layer or tensor name: bits}
    requires those tensors on that grid (LabError if one is not) and stores every other tensor as floats.
    """
    if sys.byteorder != "little":
        raise LabError("packfiles are written on little-endian machines only")
    if compressor not in COMPRESSORS:
        raise LabError(f"unknown compressor {compressor!r}; choose one of: {', '.join(COMPRESSORS)}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise LabError(f"packfile meta must be JSON values ({exc})") from None
    blobs = _Blobs()
    header = {"format": FORMAT, "version": VERSION, "arch": arch, "num_classes": int(num_classes),
              "meta": dict(meta)}
    onnx_bytes = getattr(model, "onnx_bytes", None)
    if onnx_bytes is not None:   # an OrtModule: the ONNX model is the payload
        header.update(kind="onnx", precision=getattr(model, "label", "onnx"), tensors=[],
                      payload=blobs.add(bytes(onnx_bytes)))
    else:
        _check_arch(model, arch, int(num_classes))
        header.update(kind="torch", **_model_layout(model))
        header["tensors"] = _encode_tensors(model, bits, blobs)
        quantizer = getattr(model, "_activation_quantizer", None)
        if quantizer is not None and getattr(quantizer, "qparams", None):
            st = quantizer.state()
            header["activations"] = {"bits": int(st["bits"]), "names": list(st["names"]),
                                     "scale": [float(s) for s in st["scale"].tolist()],
                                     "zero_point": [int(z) for z in st["zero_point"].tolist()]}
    header["blob_bytes"] = blobs.size
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join([struct.pack("<I", len(head)), head, *blobs.parts])
    packed = _compress(body, compressor)
    return _OUTER.pack(MAGIC, VERSION, COMPRESSORS[compressor], len(body), zlib.crc32(body)) + packed


def write(path, model: nn.Module, arch: str, num_classes: int, meta: dict, bits: dict[str, int] | None = None,
          compressor: str = DEFAULT_COMPRESSOR) -> int:
    """encode() to `path` atomically (a temp file in the same folder, then os.replace); the bytes on disk."""
    from . import cache
    cache.atomic_write_bytes(encode(model, arch, num_classes, meta, bits, compressor), Path(path))
    return Path(path).stat().st_size


def decode(data: bytes, where: str = "packfile") -> tuple[nn.Module, dict]:
    """(model in eval mode on the CPU, header) from packfile bytes; CorruptCacheEntry if they are not one.

    The header gains "file_bytes", "body_bytes" and "compressor" (from the file, not stored in the JSON)."""
    header, body, start = _open(data, where)
    try:
        if header["kind"] == "onnx":
            model = _load_onnx(header, body, start, where)
        else:
            model = _build(header, body, start, where)
    except (LabError, MemoryError):
        raise
    except Exception as exc:   # anything a damaged file makes numpy or torch trip over: one line
        raise CorruptCacheEntry(f"{where} could not be decoded ({type(exc).__name__}: {str(exc)[:160]})") from None
    return model, header


def load(path) -> tuple[nn.Module, dict]:
    """decode() of the file at `path`."""
    return decode(_read(path), str(path))


def read_header(path_or_bytes) -> dict:
    """The header of a packfile (with file_bytes, body_bytes, compressor) without building the model."""
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else _read(path_or_bytes)
    where = "packfile" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
    return _open(data, where)[0]


def is_packfile(path) -> bool:
    """Whether the file at `path` starts with the packfile magic (it may still be damaged)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def input_dtype(header: dict) -> torch.dtype:
    """The dtype the loaded model takes as input (a half-precision model: its half type)."""
    return _DTYPES.get(header.get("model_dtype", "float32"), torch.float32)


def summary(header: dict) -> dict:
    """How the file stores the model: tensors by encoding, the bit widths used, sizes."""
    tensors = header.get("tensors", [])
    bits = sorted({t["values"]["bits"] for t in tensors if t["values"]["kind"] == "codes"})
    return {"format": FORMAT, "kind": header.get("kind"), "arch": header.get("arch"),
            "tensors": len(tensors),
            "quantized_tensors": sum(t["values"]["kind"] == "codes" for t in tensors),
            "sparse_tensors": sum(t["layout"] != "dense" for t in tensors),
            "bits": bits, "compressor": header.get("compressor"),
            "body_bytes": header.get("body_bytes"), "file_bytes": header.get("file_bytes")}


# ----------------------------------------------------------------------------- encoding
class _Blobs:
    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, b: bytes) -> list[int]:
        self.parts.append(b)
        self.size += len(b)
        return [self.size - len(b), len(b)]


def _check_arch(model: nn.Module, arch: str, num_classes: int) -> None:
    """LabError now, rather than a file that cannot be loaded: `model` must have the tensors of
    build_model(arch, num_classes), none wider (built on the meta device: no memory, no time)."""
    from .models import build_model
    with torch.device("meta"):
        ref = build_model(arch, num_classes).state_dict()
    own = model.state_dict()
    if set(own) != set(ref):
        missing, unexpected = sorted(set(ref) - set(own)), sorted(set(own) - set(ref))
        raise LabError(f"this model is not a {arch} with {num_classes} classes (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    for k, t in own.items():
        if t.ndim != ref[k].ndim or any(a > b for a, b in zip(t.shape, ref[k].shape)):
            raise LabError(f"{k} of this model has shape {list(t.shape)}, which {arch}'s {list(ref[k].shape)} "
                           "cannot be pruned to")


def _model_layout(model: nn.Module) -> dict:
    floats = [p for p in list(model.parameters()) + list(model.buffers()) if p.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    channels_last = any(p.ndim == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                        for p in floats)
    return {"model_dtype": str(dtype).replace("torch.", ""),
            "memory_format": "channels_last" if channels_last else "contiguous"}


def _hint_names(model: nn.Module, bits: dict[str, int]) -> dict[str, int]:
    """{tensor name: bits} from hints naming layers ("layer1.0.conv1") or tensors ("layer1.0.conv1.weight")."""
    keys = set(model.state_dict())
    out = {}
    for name, b in bits.items():
        key = name if name in keys else f"{name}.weight"
        if key not in keys:
            raise LabError(f"bits names {name!r}, which is neither a layer nor a tensor of this model")
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BITS:
            raise LabError(f"bits for {name!r} must be an integer from 1 to {MAX_BITS}, not {b!r}")
        out[key] = b
    return out


def _encode_tensors(model: nn.Module, bits: dict[str, int] | None, blobs: _Blobs) -> list[dict]:
    from .techniques.quant_fake import channel_axis, quantizable_layers
    axes = {f"{n}.weight": channel_axis(m) for n, m in quantizable_layers(model)}
    hints = _hint_names(model, bits) if bits is not None else None
    out = []
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        grid = None
        if hints is None and name in axes:
            grid = find_grid(t, axes[name])
        elif hints and name in hints:
            grid = find_grid(t, axes.get(name, 0), only=hints[name])
            if grid is None:
                raise LabError(f"{name} does not lie on a symmetric {hints[name]}-bit grid "
                               "(quantize it with that bit width first, or leave it out of bits)")
        out.append(_encode_one(name, t, grid, blobs))
    return out


def _encode_one(name: str, t: torch.Tensor, grid, blobs: _Blobs) -> dict:
    rec = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    n = t.numel()
    if grid is not None:
        b, per_channel, axis, codes, scale = grid
        flat = codes.reshape(-1)
        values = {"kind": "codes", "bits": b, "per_channel": per_channel, "axis": axis}
        value_bytes = lambda k: math.ceil(k * b / 8)   # noqa: E731
    else:
        flat = t.reshape(-1)
        store = _storage_dtype(t)
        values = {"kind": "raw", "dtype": str(store).replace("torch.", ""),
                  "shuffled": store.is_floating_point and store.itemsize > 1}
        value_bytes = lambda k: k * store.itemsize   # noqa: E731
    nnz = int(torch.count_nonzero(flat))
    layout = _best_layout(n, nnz, value_bytes)
    rec["layout"], rec["values"] = layout, values
    if layout == "dense":
        picked = flat
    else:
        nz = flat != 0
        picked = flat[nz]
        rec["nnz"] = nnz
        if layout == "bitmask":
            rec["mask"] = blobs.add(np.packbits(nz.numpy(), bitorder="little").tobytes())
        else:
            idx = nz.nonzero().reshape(-1).numpy().astype(_index_dtype(n))
            rec["index"] = blobs.add(idx.tobytes())
    if grid is not None:
        from .techniques.quant_fake import pack_codes
        rec["codes"] = blobs.add(pack_codes(picked, b).numpy().tobytes())
        rec["scale"] = blobs.add(scale.to(torch.float32).contiguous().numpy().tobytes())
    else:
        raw = _tensor_bytes(picked.to(_DTYPES[values["dtype"]]))
        if values["shuffled"]:
            raw = _shuffle(raw, _DTYPES[values["dtype"]].itemsize)
        rec["data"] = blobs.add(raw)
    return rec


def _best_layout(n: int, nnz: int, value_bytes) -> str:
    sizes = {"dense": value_bytes(n), "bitmask": math.ceil(n / 8) + value_bytes(nnz),
             "indices": nnz * np.dtype(_index_dtype(n)).itemsize + value_bytes(nnz)}
    return min(sizes, key=lambda k: (sizes[k], k != "dense"))


def _index_dtype(n: int):
    return np.uint16 if n <= 1 << 16 else np.uint32


def _storage_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 values that fp16 holds exactly are stored as fp16; everything else as it is."""
    if t.dtype == torch.float32 and t.numel():
        head = t.reshape(-1)[:64]
        # inf, nan and values out of fp16's range all fail the comparison
        if torch.equal(head.to(torch.float16).to(torch.float32), head) and \
                torch.equal(t.to(torch.float16).to(torch.float32), t):
            return torch.float16
    return t.dtype


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _shuffle(raw: bytes, itemsize: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(raw: bytes, itemsize: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.tobytes()


# ----------------------------------------------------------------------------- the grid
def dequantize(codes: torch.Tensor, scale: torch.Tensor, axis: int, per_channel: bool) -> torch.Tensor:
    """codes.float() * scale, the scale broadcast along `axis` (quant_fake.dequantize's arithmetic)."""
    if not per_channel:
        return codes.to(torch.float32) * scale.reshape(())
    view = [1] * codes.ndim
    view[axis] = -1
    return codes.to(torch.float32) * scale.reshape(view)


def find_grid(w: torch.Tensor, axis: int = 0, only: int | None = None):
    """(bits, per_channel, axis, codes, fp32 scales) such that dequantize(codes, scales) equals `w` exactly,
    with the fewest bits (then per tensor before per channel); None when `w` lies on no such grid.

    quant_fake rounds to codes in [-qmax, qmax] (qmax = 2^(b-1)-1) with one scale per tensor or per channel,
    and the largest |w| of a row is always qmax * scale (clipping only ever clamps to ±qmax), so the scale is
    max|w| / qmax to within a rounding; the candidates a few ulps either side are tried and the result is
    verified element by element. 1 bit: every |w| of a row equals its scale, codes ±1."""
    if w.dtype != torch.float32 or w.ndim == 0 or w.numel() == 0:   # inf and nan fail every check below
        return None
    axis = axis if w.ndim > 1 else 0
    widths = [only] if only else range(1, MAX_BITS + 1)
    rows_pc = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    rows_pt = w.reshape(1, -1)
    for b, per_channel in _likely_grids(rows_pt, rows_pc, widths):
        ok, codes, scale = _fits(rows_pc if per_channel else rows_pt, b)
        if ok:
            from .techniques.quant_fake import _restore
            return b, per_channel, axis, _restore(codes, w, axis, per_channel), scale
    return None


def _likely_grids(rows_pt: torch.Tensor, rows_pc: torch.Tensor, widths) -> list[tuple[int, bool]]:
    """The (bits, per_channel) whose grid a sample of the tensor lies on to within rounding, in the order
    they are to be tried: a quick test in float64 on a few hundred elements (each row's largest |w| among
    them), so that a tensor on no grid (fp32 weights) is turned down at once."""
    flat = rows_pt.reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    top = torch.stack([flat.max(), flat.min()])
    pt = torch.cat([top, flat[::step][:_SAMPLE]]).double().numpy()[None]
    pick = torch.linspace(0, rows_pc.shape[0] - 1, min(rows_pc.shape[0], 4)).long()
    pc = rows_pc[pick].double().numpy()
    out = []
    for b in widths:
        for per_channel, x in ((False, pt), (True, pc)):
            if per_channel and rows_pc.shape[0] == 1:
                continue
            amax = np.abs(x).max(1, keepdims=True)
            if b == 1:
                ok = (amax > 0).all() and (np.abs(x) == amax).all()
            else:
                q = x / np.where(amax > 0, amax, 1) * (2 ** (b - 1) - 1)
                ok = (np.abs(q - np.round(q)) < 0.01).all()
            if ok:
                out.append((b, per_channel))
    return out


def _fits(rows: torch.Tensor, b: int):
    """(all rows on a b-bit grid, codes, per-row scales) for a 2-D float tensor."""
    amax = rows.abs().amax(1)
    if b == 1:
        ok = bool((amax > 0).all()) and bool((rows.abs() == amax[:, None]).all())
        codes = torch.where(rows >= 0, 1, -1).to(torch.int8)
        return ok, codes, amax
    qmax = 2 ** (b - 1) - 1
    base = amax / qmax
    found = torch.zeros(len(rows), dtype=torch.bool)
    scale = torch.zeros_like(amax)
    codes = torch.zeros(rows.shape, dtype=torch.int8 if b <= 8 else torch.int16)
    for step in _ulp_steps():
        cand = _nudge(base, step)
        cand = torch.where(amax == 0, torch.zeros_like(cand), cand)
        todo = None if step == 0 else (~found).nonzero().reshape(-1)   # the first try takes every row as is
        r, s = (rows, cand) if todo is None else (rows[todo], cand[todo])
        c = torch.clamp(torch.round(r / torch.where(s == 0, torch.ones_like(s), s)[:, None]), -qmax, qmax)
        good = (c * s[:, None] == r).all(1)
        idx = good.nonzero().reshape(-1) if todo is None else todo[good]
        if todo is None and bool(good.all()):
            return True, c.to(codes.dtype), s
        scale[idx] = s[good]
        codes[idx] = c[good].to(codes.dtype)
        found[idx] = True
        if bool(found.all()):
            return True, codes, scale
    return False, codes, scale


def _ulp_steps():
    yield 0
    for k in range(1, _ULPS + 1):
        yield k
        yield -k


def _nudge(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x moved by `steps` units in the last place (fp32, positive x)."""
    if steps == 0:
        return x
    bits = x.contiguous().view(torch.int32) + steps
    return bits.view(torch.float32)


# ----------------------------------------------------------------------------- compression
def _compress(body: bytes, compressor: str) -> bytes:
    if compressor == "lzma":
        return lzma.compress(body, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=LZMA_PRESET)
    if compressor == "zlib":
        return zlib.compress(body, ZLIB_LEVEL)
    return body


def _decompress(packed: bytes, cid: int, size: int, where: str) -> bytes:
    if cid == COMPRESSORS["none"]:
        if len(packed) != size:
            raise CorruptCacheEntry(f"{where} is truncated or damaged (a body of {len(packed)} bytes, "
                                    f"the header says {size})")
        return packed
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ) if cid == COMPRESSORS["lzma"] else zlib.decompressobj()
    try:
        body = dec.decompress(packed, size + 1)
    except (lzma.LZMAError, zlib.error) as exc:
        raise CorruptCacheEntry(f"{where} is damaged: its compressed data does not decode ({exc})") from None
    if not dec.eof:
        if len(body) > size:
            raise CorruptCacheEntry(f"{where} is damaged: it holds more data than its header says")
        raise CorruptCacheEntry(f"{where} is truncated: its compressed data ends early")
    if dec.unused_data:
        raise CorruptCacheEntry(f"{where} is damaged: bytes follow the end of its compressed data")
    return body


# ----------------------------------------------------------------------------- decoding
def _read(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise LabError(f"cannot read {path}: {exc.strerror or exc}") from None


def _open(data: bytes, where: str) -> tuple[dict, bytes, int]:
    """Check the outer header, decompress, parse the JSON header: (header, body, start of the blob area)."""
    data = bytes(data)
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise CorruptCacheEntry(f"{where} is not a packfile (it does not start with the packfile magic bytes)")
    if len(data) < _OUTER.size:
        raise CorruptCacheEntry(f"{where} is truncated ({len(data)} bytes)")
    _, version, cid, size, crc = _OUTER.unpack_from(data)
    if version != VERSION:
        raise CorruptCacheEntry(f"{where} is a packfile of version {version}; this lab reads version {VERSION}")
    if cid not in COMPRESSORS.values():
        raise CorruptCacheEntry(f"{where} is damaged: unknown compressor id {cid}")
    body = _decompress(data[_OUTER.size:], cid, size, where)
    if len(body) != size or zlib.crc32(body) != crc:
        raise CorruptCacheEntry(f"{where} is damaged: its contents do not match their checksum")
    try:
        (hlen,) = struct.unpack_from("<I", body)
        header = json.loads(body[4:4 + hlen].decode())
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("not a packfile header")
        for key, kind in (("arch", str), ("num_classes", int), ("meta", dict), ("tensors", list),
                          ("blob_bytes", int), ("kind", str)):
            if not isinstance(header.get(key), kind):
                raise ValueError(f"{key} missing or of the wrong type")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CorruptCacheEntry(f"{where} is damaged: its header does not parse ({str(exc)[:120]})") from None
    start = 4 + hlen
    if start + header["blob_bytes"] != len(body):
        raise CorruptCacheEntry(f"{where} is damaged: its arrays take {len(body) - start} bytes, "
                                f"the header says {header['blob_bytes']}")
    if header["kind"] not in ("torch", "onnx"):
        raise CorruptCacheEntry(f"{where} holds a model of unknown kind {header['kind']!r}")
    header.update(file_bytes=len(data), body_bytes=size,
                  compressor={v: k for k, v in COMPRESSORS.items()}[cid])
    return header, body, start


class _Area:
    """The blob area: segments [offset, length] checked against its bounds and the expected length."""

    def __init__(self, body: bytes, start: int, size: int, where: str):
        self.body, self.start, self.size, self.where = body, start, size, where

    def get(self, seg, name: str, what: str, expect: int | None = None) -> bytes:
        ok = (isinstance(seg, list) and len(seg) == 2 and all(isinstance(v, int) and v >= 0 for v in seg)
              and seg[0] + seg[1] <= self.size)
        if not ok:
            raise CorruptCacheEntry(f"{self.where} is damaged: the {what} of {name} lie outside the file")
        if expect is not None and seg[1] != expect:
            raise CorruptCacheEntry(f"{self.where} is damaged: the {what} of {name} take {seg[1]} bytes, "
                                    f"{expect} expected")
        a = self.start + seg[0]
        return self.body[a:a + seg[1]]


def _build(header: dict, body: bytes, start: int, where: str) -> nn.Module:
    from .models import build_model
    from .techniques.pruning import shrink_to_state
    arch, num_classes = header["arch"], header["num_classes"]
    if not 1 <= num_classes <= 100_000:
        raise CorruptCacheEntry(f"{where} is damaged: {num_classes} classes")
    model = build_model(arch, num_classes)   # LabError for an architecture this lab does not know
    dtype = input_dtype(header)
    if dtype != torch.float32:
        model = model.to(dtype)
    base = model.state_dict()
    recs = header["tensors"]
    names = [r.get("name") if isinstance(r, dict) else None for r in recs]
    if len(set(names)) != len(names) or set(names) != set(base):
        missing, unexpected = sorted(set(base) - set(names)), sorted(set(names) - set(base), key=str)
        raise CorruptCacheEntry(f"{where} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    area = _Area(body, start, header["blob_bytes"], where)
    state = {}
    for rec in recs:
        name, shape = rec["name"], rec["shape"]
        ref = base[name].shape
        if (not isinstance(shape, list) or len(shape) != len(ref)
                or not all(isinstance(s, int) and 0 <= s <= r for s, r in zip(shape, ref))):
            raise CorruptCacheEntry(f"{where} is damaged: {name} has shape {shape}, which {arch}'s "
                                    f"{list(ref)} cannot be pruned to")
        state[name] = _decode_one(rec, area)
    shrink_to_state(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CorruptCacheEntry(f"{where} does not fit {arch}: {str(exc)[:160]}") from None
    if header.get("memory_format") == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    model = model.cpu().eval()
    act = header.get("activations")
    if act:
        from .techniques.quant_fake import ActivationQuantizer
        quantizer = ActivationQuantizer(model, int(act["bits"]))
        if not (len(act["names"]) == len(act["scale"]) == len(act["zero_point"])):
            raise CorruptCacheEntry(f"{where} is damaged: activation ranges do not add up")
        quantizer.load({"names": act["names"], "scale": torch.tensor(act["scale"], dtype=torch.float64),
                        "zero_point": torch.tensor(act["zero_point"], dtype=torch.int64)})
        model._activation_quantizer = quantizer
    return model


def _decode_one(rec: dict, area: _Area) -> torch.Tensor:
    name, shape = rec["name"], rec["shape"]
    dtype = _DTYPES.get(rec["dtype"])
    values = rec["values"]
    if dtype is None or not isinstance(values, dict):
        raise CorruptCacheEntry(f"{area.where} is damaged: {name} has an unknown dtype or encoding")
    n = math.prod(shape)
    layout = rec["layout"]
    if layout == "dense":
        nnz, positions = n, None
    elif layout in ("bitmask", "indices"):
        nnz = rec["nnz"]
        if not isinstance(nnz, int) or not 0 <= nnz <= n:
            raise CorruptCacheEntry(f"{area.where} is damaged: {name} has {nnz} nonzero elements of {n}")
        if layout == "bitmask":
            mask = np.unpackbits(np.frombuffer(area.get(rec["mask"], name, "mask", math.ceil(n / 8)), np.uint8),
                                 count=n, bitorder="little").astype(bool)
            if int(mask.sum()) != nnz:
                raise CorruptCacheEntry(f"{area.where} is damaged: the mask of {name} does not add up")
            positions = torch.from_numpy(mask)
        else:
            idt = np.dtype(_index_dtype(n))
            idx = np.frombuffer(area.get(rec["index"], name, "indices", nnz * idt.itemsize), idt)
            if nnz and (int(idx.max()) >= n or (nnz > 1 and not (np.diff(idx.astype(np.int64)) > 0).all())):
                raise CorruptCacheEntry(f"{area.where} is damaged: the indices of {name} do not add up")
            positions = torch.from_numpy(idx.astype(np.int64))
    else:
        raise CorruptCacheEntry(f"{area.where} is damaged: {name} has an unknown layout {layout!r}")

    if values["kind"] == "codes":
        from .techniques.quant_fake import unpack_codes
        b, per_channel, axis = values["bits"], values["per_channel"], values["axis"]
        if not (isinstance(b, int) and 1 <= b <= MAX_BITS and isinstance(per_channel, bool)
                and isinstance(axis, int) and 0 <= axis < max(1, len(shape)) and dtype == torch.float32):
            raise CorruptCacheEntry(f"{area.where} is damaged: {name} has an invalid bit width or axis")
        packed = area.get(rec["codes"], name, "codes", math.ceil(nnz * b / 8))
        picked = unpack_codes(torch.from_numpy(np.frombuffer(packed, np.uint8).copy()), b, (nnz,))
        n_scales = shape[axis] if per_channel else 1
        scale = torch.from_numpy(np.frombuffer(area.get(rec["scale"], name, "scales", 4 * n_scales),
                                               np.float32).copy())
        codes = _scatter(picked, positions, n, layout).reshape(shape)
        return dequantize(codes, scale, axis, per_channel)
    if values["kind"] != "raw" or values.get("dtype") not in _DTYPES:
        raise CorruptCacheEntry(f"{area.where} is damaged: {name} has an unknown encoding")
    store = _DTYPES[values["dtype"]]
    raw = area.get(rec["data"], name, "values", nnz * store.itemsize)
    if values.get("shuffled"):
        raw = _unshuffle(raw, store.itemsize)
    picked = _from_bytes(raw, store).to(dtype)
    return _scatter(picked, positions, n, layout).reshape(shape)


def _from_bytes(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.zeros(0, dtype=dtype)
    return torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).view(dtype)


def _scatter(picked: torch.Tensor, positions, n: int, layout: str) -> torch.Tensor:
    if layout == "dense":
        return picked
    full = torch.zeros(n, dtype=picked.dtype)
    full[positions] = picked
    return full


def _load_onnx(header: dict, body: bytes, start: int, where: str) -> nn.Module:
    from .techniques.ort_session import OrtModule
    payload = _Area(body, start, header["blob_bytes"], where).get(header.get("payload"), "the model", "ONNX bytes")
    model = OrtModule(payload, str(header.get("precision", "onnx")))
    try:
        model.session(1)   # parse now: a damaged graph is refused here, not at the first prediction
    except Exception as exc:
        raise CorruptCacheEntry(f"{where} holds an ONNX model ONNX Runtime cannot load "
                                f"({type(exc).__name__}: {str(exc)[:120]})") from None
    return model
