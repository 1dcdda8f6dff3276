import dataclasses

import streamlit as st

from core import views
from core.models import MODELS
from core.measure import has_latency, stored_baseline
from core.datasets import FOLDER_SETTINGS, write_folder_settings
from core.teachers import TeacherSettings, find_teacher, pretrained_problem
from core.training import recipe_for
from pages import _errors, _jobs, _resources, _roles, _selection, _widgets

ss = st.session_state
st.title("Teacher")
data = _resources.require_data()
model = ss.teacher_model
title = MODELS[model].title
st.caption(f"{title} ({MODELS[model].description}) on {data.label}. Every compression starts from the newest "
           "cached teacher of this dataset and architecture.")

recipe = recipe_for(data, model, ss.device)   # the dataset's default recipe (short on generated data)
with st.container(border=True):   # plain widgets, so the estimate below sees the current values
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Epochs", 1, 200, recipe.epochs, key="teacher.epochs",
                             help="A few epochs are enough on Shapes; real datasets want more.")
    subset = c2.number_input("Training images (0 = all)", 0, len(data.train_y), 0, step=500,
                             key="teacher.subset")
    lr = c3.select_slider("Peak learning rate", [0.01, 0.02, 0.05, 0.1, 0.2], value=recipe.lr,
                          key="teacher.lr")
    batch = c4.select_slider("Batch size", [32, 64, 128, 256], value=recipe.batch_size, key="teacher.batch")
    bf16 = st.toggle("bfloat16 autocast", value=recipe.precision == "bf16", key="teacher.bf16",
                     help="Runs the layers in bfloat16 while the weights stay fp32: 1.2-1.6x faster training on "
                          "CPUs with AVX-512 BF16 or AMX and on recent GPUs; slow where the hardware lacks it. "
                          f"Default here: {'on' if recipe.precision == 'bf16' else 'off'}.")
    pretrained = st.toggle("Start from ImageNet weights", value=False, key="teacher.pretrained",
                           help="Fine-tune torchvision's ImageNet-trained weights (all but the last layer) instead of "
                                "starting from random ones, as the seed study's teachers did. Downloaded once into "
                                "torch's hub cache; offline they must be there already.")
    if data.name.startswith("folder:"):   # an image folder's augmentation is the folder's own setting
        folder = data.name[len("folder:"):]
        flip_key = f"teacher.flip.{folder}"
        ss[flip_key] = data.flip   # what the folder's lab.json says now (another session may have changed it)

        def _set_flip(folder=folder, flip_key=flip_key):
            if not _roles.can("train_teacher"):
                return
            try:
                write_folder_settings(folder, flip=bool(ss[flip_key]))
                _resources._load_data.clear()   # every page reloads the folder with its new setting (and fingerprint)
            except Exception as exc:   # a read-only folder: say so, the switch goes back
                ss["teacher.flip_error"] = str(exc)
        st.toggle("Horizontal flips for this folder", key=flip_key, on_change=_set_flip,
                  disabled=not _roles.can("train_teacher"),
                  help=f"Mirror training images at random. Off unless the folder asks for it: a mirrored digit, "
                       f"letter or sign is another class (or none), while photos of things lose only a little "
                       f"accuracy without flips. Saved in {folder}/{FOLDER_SETTINGS} as {{\"flip\": true}}; "
                       f"each setting has its own cached teachers.")
        if msg := ss.pop("teacher.flip_error", None):
            st.error(f"Could not change the setting: {msg}", icon=":material/error:")

settings = TeacherSettings(model, dataclasses.replace(recipe, epochs=int(epochs), subset=int(subset),
                                                     lr=float(lr), batch_size=int(batch),
                                                     precision="bf16" if bf16 else "fp32"), pretrained=bool(pretrained))
weights_problem = pretrained_problem(data, settings)   # offline without the weights: say so before training
if weights_problem:
    st.warning(weights_problem, icon=":material/cloud_off:")
est_key = (data.name, model, int(epochs), int(subset), int(batch), bool(bf16), ss.device)
train_payload = {"dataset": _selection.dataset_name(), "data_root": None, "model": model, "train": dataclasses.asdict(settings.train),
                 "pretrained": settings.pretrained, "device": ss.device, "measure": False}
if st.button("Estimate the training time", icon=":material/timer:", key="teacher.estimate",
             help="Times a few training batches of these settings on this machine (a few seconds)."):
    est = _jobs.follow(_jobs.lab().submit("estimate", dict(train_payload, measure=False), owner=_jobs.owner(),
                                    label=f"estimate {title}"), "Timing a few training batches…", chart=False)
    if est is not None:
        ss.setdefault("teacher.estimates", {})[est_key] = est
if est := ss.get("teacher.estimates", {}).get(est_key):
    st.info(f"Estimated on this machine: **{est['text']}** ({est['seconds_per_epoch']:.0f} s per epoch, "
            f"{est['images_per_second']:.0f} images/s, {est['threads']} threads, {est['device']}).",
            icon=":material/timer:")
if _roles.can("train_teacher"):
    submitted = st.button("Train (or load if these settings are cached)", type="primary", key="teacher.train",
                          icon=":material/model_training:", disabled=bool(weights_problem))
else:
    submitted = False
    st.caption("Class mode: only the instructor trains teachers; every compression page uses the cached one.")
if submitted and _roles.require_instructor("train_teacher"):   # checked where it trains, not only by hiding the button
    with _errors.guarded("Training failed: "):
        if find_teacher(data, settings) is not None:
            st.success("A teacher with these settings is already cached: nothing to train. (The "
                       "compression pages use the newest cached teacher.)", icon=":material/check_circle:")
        else:
            job = _jobs.submit("train", train_payload, label=f"train {title} on {data.name}")
            if job is not None:
                ss["teacher.training"] = job.id

# training runs in a worker: this session follows it (again after a rerun or a visit to another page)
training = _jobs.lab().get(ss.get("teacher.training", "")) or _jobs.lab().find("train", train_payload)
if training is not None and (training.active or ss.get("teacher.training") == training.id):
    ss.pop("teacher.training", None)
    out = _jobs.follow(training, f"Training {title} for {int(epochs)} epoch(s)…")
    if out is not None:
        ss["teacher.trained"] = f"Trained {title} in {sum(h['seconds'] for h in out['history']):.0f} s on {training.node}."
        st.rerun()   # so the sidebar and every page see the new teacher

if msg := ss.pop("teacher.trained", None):
    st.success(msg, icon=":material/check_circle:")
if msg := ss.pop("teacher.deleted", None):
    st.success(msg, icon=":material/delete:")

teacher = _resources.current_teacher(data)
if teacher is None:
    st.info(f"No {title} teacher is cached for {data.label} yet: choose the epochs and press **Train**.", icon=":material/info:")
    st.stop()

meta = teacher.meta
st.subheader("Current teacher")
tr = (meta.get("settings") or {}).get("train", {})
st.caption(f"trained {meta.get('created', '?')} on {meta.get('device', '?')} · {tr.get('epochs', '?')} epochs · "
           f"{'all' if not tr.get('subset') else tr.get('subset')} training images · {tr.get('precision', 'fp32')} · "
           f"{meta.get('train_seconds', 0):.0f} s of training · "
           f"{'from ImageNet weights' if (meta.get('settings') or {}).get('pretrained') else 'from random weights'} · "
           f"file {teacher.path.name}")
target = ss.get("target") or "edge-cpu"
m = stored_baseline(meta, int(ss.eval_size), target)
if not has_latency(m):   # measured once per teacher, evaluation size and target, latency included, in a worker
    m = _jobs.follow(_jobs.lab().submit("baseline", {"dataset": _selection.dataset_name(), "model": model,
                                                     "eval_size": int(ss.eval_size), "target": target},
                                        owner=_jobs.owner(), label=f"measure {title}"),
                  "Measuring accuracy, size, MACs and latency (once per teacher)…", chart=False)
if m is not None:
    _widgets.teacher_metric_row(m)
hist = meta.get("history") or []
if hist:
    st.altair_chart(views.history_chart(views.history_frame({"train": hist})), width="stretch")
    st.caption("Solid: validation accuracy (fixed test subset); dashed: training accuracy (with augmentation).")

if _roles.can("delete_teacher"):
    with st.expander("Delete this teacher"):
        st.caption(f"Removes {teacher.path.name} and its sidecar from the cache; the compression pages then use the "
                   "next newest teacher of this dataset and architecture, if any. Stored runs stay.")
        sure = st.checkbox("Yes, delete this teacher", key="teacher.delete_sure")
        if st.button("Delete this teacher", disabled=not sure, key="teacher.delete", icon=":material/delete:") \
                and _roles.require_instructor("delete_teacher"):
            with _errors.guarded("Could not delete the teacher: "):
                from core.teachers import delete_teacher_file
                delete_teacher_file(teacher.path)
                ss.pop("teacher.delete_sure", None)
                ss["teacher.deleted"] = f"Deleted the {title} teacher {teacher.path.name}."
                st.rerun()
