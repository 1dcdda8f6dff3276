"""Rewrites of ONNX graphs that keep their computation: what int8 files store (int8 weights for layers
kept in fp32, compact names and quantization parameters), what sessions run (those weights expanded,
1x1-map convolutions cut to their centre tap), batch norms as depthwise convolutions, and a summary."""
from __future__ import annotations

import math

import numpy as np


def _weight_axis(node) -> int | None:
    """The output-channel axis of a Conv's or Gemm's weight (input 1), None for other layouts."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        return 0 if attrs.get("transB", 0) else 1
    return None


def graph_index(g):
    """Initializers by name, the node making each tensor, and the nodes reading each tensor."""
    readers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    return {t.name: t for t in g.initializer}, {o: n for n in g.node for o in n.output}, readers


def store_weights_int8(model, node_names: set[str]) -> int:
    """Store the fp32 weights of `node_names` as per-channel symmetric int8 + DequantizeLinear.

    Layers kept in fp32 would otherwise keep their fp32 weights in the file (DenseNet-121's
    denseblock4: 6 MB, file ratio 3.8x -> 2.0x). ONNX Runtime never constant-folds DequantizeLinear,
    so `expand_stored_weights` does it before a session is made. Returns how many weights.
    """
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    inits, _, readers = graph_index(g)
    new_nodes = []
    for n in g.node:
        axis = _weight_axis(n)
        if (n.name not in node_names or axis is None or len(n.input) < 2 or n.input[1] not in inits
                or len(readers[n.input[1]]) != 1 or inits[n.input[1]].data_type != TensorProto.FLOAT):
            continue
        name = n.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        amax = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        inits[name].CopyFrom(numpy_helper.from_array(q, name))
        g.initializer.append(numpy_helper.from_array(scale, name + "_scale"))
        # no zero point: DequantizeLinear's default is 0 of the weight's type
        new_nodes.append(helper.make_node("DequantizeLinear", [name, name + "_scale"], [name + "_fp32"], axis=axis))
        n.input[1] = name + "_fp32"
    if new_nodes:
        nodes = new_nodes + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    return len(new_nodes)


def _rewritten(onnx_bytes: bytes, needs: bytes, rewrite) -> bytes:
    """The bytes after an in-place graph `rewrite` (returning whether it changed anything); skipped
    without parsing when the serialized model does not even contain `needs`."""
    import onnx
    if needs not in onnx_bytes:
        return onnx_bytes
    model = onnx.load_from_string(onnx_bytes)
    return model.SerializeToString() if rewrite(model) else onnx_bytes


def depthwise_batch_norms(onnx_bytes: bytes) -> bytes:
    """Each batch norm that the exporter could not fold into a convolution, as the equal depthwise 1x1
    convolution (weight gamma / sqrt(var + eps), bias beta - mean * weight).

    DenseNet's batch norms come before their ReLU and convolution. ONNX Runtime has no int8 batch
    norm, so each one ran in fp32 between a DequantizeLinear and a QuantizeLinear, with layout
    transposes around it; as a convolution it is quantized (its per-channel int8 weight is exact),
    its ReLU folds into it, and the concatenations between int8 tensors fuse into QLinearConcat.
    DenseNet-121, batch 1, trained on CIFAR-10: 488 -> 264 nodes with every layer in int8.
    """
    return _rewritten(onnx_bytes, b"BatchNormalization", _batch_norms_as_depthwise)


def _batch_norms_as_depthwise(model) -> bool:
    from onnx import helper, numpy_helper
    g = model.graph
    inits, made_by, _ = graph_index(g)

    def const(name):
        while name not in inits and name in made_by and made_by[name].op_type == "Identity":
            name = made_by[name].input[0]   # the exporter shares equal tensors through Identity nodes
        return numpy_helper.to_array(inits[name]).astype(np.float64) if name in inits else None

    done = 0
    for i, n in enumerate(g.node):
        params = [const(x) for x in n.input[1:]] if n.op_type == "BatchNormalization" else []
        if len(params) != 4 or any(p is None for p in params) or len(n.output) != 1:
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = params
        a = scale / np.sqrt(var + eps)
        w, b = f"bn_dw_{done}_w", f"bn_dw_{done}_b"
        g.initializer.extend([numpy_helper.from_array(a.reshape(-1, 1, 1, 1).astype(np.float32), w),
                              numpy_helper.from_array((bias - mean * a).astype(np.float32), b)])
        g.node[i].CopyFrom(helper.make_node("Conv", [n.input[0], w, b], list(n.output), name=n.name + "_dw",
                                            group=len(a), kernel_shape=[1, 1]))
        done += 1
    if done:
        used = {x for n in g.node for x in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return done > 0


def expand_stored_weights(onnx_bytes: bytes) -> bytes:
    """Fold each DequantizeLinear of a constant int8 weight whose layer reads a float activation
    (written by `store_weights_int8`) into an fp32 initializer. Weights of int8 layers (their
    activation comes from a DequantizeLinear too) are left to ONNX Runtime's int8 kernels."""
    return _rewritten(onnx_bytes, b"DequantizeLinear", _expand_stored)


def _expand_stored(model) -> bool:
    """`expand_stored_weights` on a loaded model, in place; whether anything changed."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    inits, made_by, readers = graph_index(g)
    graph_inputs = {v.name for v in g.input}
    fold = []
    for n in g.node:
        if (n.op_type != "DequantizeLinear" or not all(x in inits for x in n.input)
                or inits[n.input[0]].data_type != onnx.TensorProto.INT8):
            continue
        users = readers.get(n.output[0], [])
        if users and all(u.input[0] in graph_inputs or (u.input[0] in made_by and
                                                        made_by[u.input[0]].op_type != "DequantizeLinear")
                         for u in users):
            fold.append(n)
    if not fold:
        return False
    for n in fold:
        q, scale = (numpy_helper.to_array(inits[x]) for x in n.input[:2])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        zero = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 else np.zeros_like(scale)
        w = (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)
        g.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
    dead = {x for n in fold for x in n.input}
    folded = {id(n) for n in fold}
    keep = [n for n in g.node if id(n) not in folded]
    del g.node[:]
    g.node.extend(keep)
    still_used = {x for n in g.node for x in n.input}
    kept = [t for t in g.initializer if t.name not in dead or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return True


def runtime_graph(onnx_bytes: bytes) -> bytes:
    """The graph a session runs: int8-stored fp32 weights expanded, and convolutions that only ever see
    a 1x1 map cut to their centre tap. The stored file (and the size the lab reports) is unchanged."""
    import onnx
    if b"Conv" not in onnx_bytes and b"DequantizeLinear" not in onnx_bytes:
        return onnx_bytes
    model = onnx.load_from_string(onnx_bytes)   # parsed once: a VGG16 file is 0.5 GB
    changed = _expand_stored(model) if b"DequantizeLinear" in onnx_bytes else False
    changed = _cut_centre_taps(model) or changed
    return model.SerializeToString() if changed else onnx_bytes


def _spatial_shapes(model) -> dict[str, list[int]]:
    """Tensor shapes by ONNX shape inference, without copying large weights into the inference."""
    from onnx import shape_inference
    held = {}
    for t in model.graph.initializer:
        if len(t.raw_data) > 4096:   # shapes come from dims; small constants (shape tensors) keep their data
            held[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        g = shape_inference.infer_shapes(model).graph
    finally:
        for t in model.graph.initializer:
            if t.name in held:
                t.raw_data = held[t.name]
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(g.value_info) + list(g.input) + list(g.output)}


def centre_taps(onnx_bytes: bytes) -> bytes:
    """Cut each k x k convolution whose input map is 1x1 (padding k//2, no dilation) to a 1x1 one.

    At the lab's 32x32 input, ResNets reach 1x1 maps in layer4 and DenseNet-121 in denseblock4: there
    a padded 3x3 convolution only ever multiplies its centre weight by data, the other eight by the
    zero padding (five of ResNet-34's layer4 convolutions: 10.5 M of the model's 21.3 M weights).
    Same outputs; the int8 ResNet-34 then fits the CPU cache (docs/bench_quantization.md, 2026-11-29).
    """
    return _rewritten(onnx_bytes, b"Conv", _cut_centre_taps)


def _cut_centre_taps(model) -> bool:
    """`centre_taps` on a loaded model, in place; whether anything changed."""
    import onnx
    from onnx import helper, numpy_helper
    g = model.graph
    inits, made_by, readers = graph_index(g)

    def attrs(n):
        return {a.name: list(a.ints) for a in n.attribute if a.type == onnx.AttributeProto.INTS}

    candidates = [n for n in g.node if n.op_type == "Conv"
                  and any(k > 1 for k in attrs(n).get("kernel_shape", []))]
    if not candidates:
        return False
    shapes = _spatial_shapes(model)
    done = 0
    for n in candidates:
        a = attrs(n)
        k = a["kernel_shape"]
        if (len(k) != 2 or any(v % 2 == 0 for v in k)
                or shapes.get(n.input[0], [])[2:] != [1, 1]
                or a.get("pads", [0] * 4) != [k[0] // 2, k[1] // 2] * 2
                or any(d != 1 for d in a.get("dilations", [1, 1]))):
            continue
        weight = n.input[1]
        if len(readers.get(weight, [])) != 1:
            continue   # a weight shared by several convolutions (the exporter merges equal ones, e.g. zeros)
        if weight not in inits and weight in made_by and made_by[weight].op_type == "DequantizeLinear":
            weight = made_by[weight].input[0]    # an int8 weight: its per-output-channel scales still apply
        if weight not in inits or len(readers.get(weight, [])) != 1:
            continue
        w = numpy_helper.to_array(inits[weight])
        c0, c1 = k[0] // 2, k[1] // 2
        inits[weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, :, c0:c0 + 1, c1:c1 + 1]), weight))
        for attr in list(n.attribute):
            if attr.name in ("kernel_shape", "pads", "auto_pad"):
                n.attribute.remove(attr)
        n.attribute.extend([helper.make_attribute("kernel_shape", [1, 1]),
                            helper.make_attribute("pads", [0, 0, 0, 0])])
        done += 1
    return done > 0


def compact(onnx_bytes: bytes) -> bytes:
    """Short tensor names, no node names or doc strings, no quantization parameter a session can compute
    (`slim_quant_params`): the same computation, a smaller file.

    A QDQ graph names every scale, zero point and intermediate tensor after its layer, which
    adds ~0.5 MB to a DenseNet-121 (ratio 3.56× -> 3.76×). Graph inputs/outputs keep their names.
    """
    import onnx
    model = onnx.load_from_string(onnx_bytes)
    slim_quant_params(model)
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return onnx_bytes   # subgraphs would need recursive renaming
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for n in g.node:
        n.name, n.doc_string = "", ""
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
    for t in g.initializer:
        t.name = short(t.name)
    del g.value_info[:]
    model.doc_string = ""
    return model.SerializeToString()


def slim_quant_params(model) -> int:
    """Store no quantization parameter that a session can compute when it loads: per-channel zero points
    that are all zero become ConstantOfShape nodes, and each int32 bias's scale, which ORT's quantizer
    sets to input scale x weight scale, becomes a Mul of the two (both folded when the session loads).

    With DenseNet-121's batch norms as depthwise convolutions, these were 5% of its int8 file
    (0.38 MB: file ratio 3.66x -> 3.87x). Only exact matches are replaced; returns how many tensors.
    """
    from onnx import helper, numpy_helper
    g = model.graph
    inits, made_by, readers = graph_index(g)
    new_nodes, dead, made = [], set(), {}

    def only_dq_reads(name):
        return all(r.op_type == "DequantizeLinear" for r in readers.get(name, []))

    def zeros(dtype, n):
        key = (dtype, n)
        if key not in made:
            shape = f"qp_shape_{n}"
            if shape not in inits:
                inits[shape] = numpy_helper.from_array(np.array([n], dtype=np.int64), shape)
                g.initializer.append(inits[shape])
            made[key] = f"qp_zeros_{n}_{dtype}"
            new_nodes.append(helper.make_node("ConstantOfShape", [shape], [made[key]], value=helper.make_tensor(
                "value", dtype, [1], [0])))
        return made[key]

    done = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3:
            continue
        zp = n.input[2]
        if zp in inits and only_dq_reads(zp) and math.prod(inits[zp].dims) > 1:
            z = numpy_helper.to_array(inits[zp])
            if z.ndim == 1 and not z.any():
                dead.add(zp)
                n.input[2] = zeros(inits[zp].data_type, len(z))
                done += 1
        scale = _bias_scale_product(n, inits, made_by, readers)
        if scale is not None:
            dead.add(n.input[1])
            name = n.input[1] + "_product"
            new_nodes.append(helper.make_node("Mul", list(scale), [name]))
            n.input[1] = name
            done += 1
    if done:
        still = {x for m in list(g.node) + new_nodes for x in m.input}
        keep = [t for t in g.initializer if t.name not in dead or t.name in still]
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = new_nodes + list(g.node)   # the constants first: nodes stay topologically sorted
        del g.node[:]
        g.node.extend(nodes)
    return done


def _bias_scale_product(dq, inits, made_by, readers):
    """(input scale, weight scale) names when `dq` dequantizes a Conv/Gemm int32 bias whose stored scale is
    exactly their float32 product, else None."""
    from onnx import TensorProto, numpy_helper
    bias, scale = dq.input[0], dq.input[1]
    users = readers.get(dq.output[0], [])
    if (bias not in inits or inits[bias].data_type != TensorProto.INT32 or scale not in inits
            or len(readers.get(scale, [])) != 1 or len(users) != 1 or users[0].op_type not in ("Conv", "Gemm")
            or len(users[0].input) < 3 or users[0].input[2] != dq.output[0]):
        return None
    sources = [made_by.get(x) for x in users[0].input[:2]]
    if any(s is None or s.op_type != "DequantizeLinear" or s.input[1] not in inits for s in sources):
        return None
    x_scale, w_scale = (numpy_helper.to_array(inits[s.input[1]]) for s in sources)
    if x_scale.size != 1 or x_scale.dtype != np.float32 or w_scale.dtype != np.float32:
        return None
    stored = numpy_helper.to_array(inits[scale])
    product = x_scale * w_scale
    if product.shape != stored.shape or not np.array_equal(product, stored):
        return None
    return sources[0].input[1], sources[1].input[1]


def onnx_summary(onnx_bytes: bytes) -> dict:
    """What got quantized: int8 weights vs float tensors left, and conv/matmul nodes reading int8 weights."""
    import onnx
    from onnx import TensorProto
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    int8_params = sum(math.prod(t.dims) for t in g.initializer
                      if t.data_type in (TensorProto.INT8, TensorProto.UINT8))
    float_params = sum(math.prod(t.dims) for t in g.initializer
                       if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE))
    int8_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == TensorProto.INT8}
    compute = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")]
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    return {"int8_params": int(int8_params), "float_params_left": int(float_params),
            "compute_ops": len(compute),
            # int8 kernels: int8 weights and a quantized input (layers kept in fp32 only store int8 weights)
            "int8_compute_ops": sum(1 for n in compute if len(n.input) > 1 and n.input[1] in int8_dq
                                    and n.input[0] in dq_out)}
