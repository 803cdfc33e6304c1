"""Train: a run that teaches in two minutes. Start a small model training in the background,
or an experiment (two or three runs that differ in one setting, one after the other), and
watch it live: progress and time left, curves every few seconds, and the attention of every
layer drawn on the probe image as it organises."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import streamlit as st

from pages import _controls as controls, _pickers as pickers, _state as state
from visattn import maps, paths
from visattn.app import experiments, figures, runs, views
from visattn.errors import VisattnError
from visattn.models.attention import POS_ENCODINGS, SIMILARITIES

FORM = runs.DEFAULT_FORM
FINAL = ("done", "failed")


def main() -> None:
    if st.session_state.pop("train_open_explore", False):  # "Open in Explore": the picker is set to the run
        state.switch_to("explore")
    st.title("Train a model")
    st.markdown("Train a small model on CIFAR-10 in the background and watch it learn: the loss falls, the "
                "accuracy rises, and the attention of every layer, drawn on the probe image, changes as it learns "
                "(its entropy, against uniform attention's log N, says how focused it is). The defaults train a small "
                f"model on all 50,000 images for {FORM['epochs']} epochs, about two minutes on two CPU cores "
                "(`make bench` times them). Finished runs appear in the sidebar's model picker.")
    path = paths.data()
    have_data = views.data_available(path)
    if not have_data:
        st.info(f"The data set is not available at {path}: training needs it (set VISATTN_DATA to an image-folder "
                "data set with train/ and test/). You can still watch earlier runs below.")
    else:
        start_form(path)
    running = runs.running()
    if running:
        st.subheader("Running")
        for run_name, pid in running.items():
            c1, c2 = st.columns([3, 1], vertical_alignment="center")
            c1.markdown(f"**{run_name}** · process {pid}")
            if c2.button("Stop", key=f"stop_{run_name}", help="terminate the run (its last finished epoch is kept)"):
                with state.guard("stopping the run"):
                    runs.stop_training(run_name)
                    st.rerun()
    watch(running)


def start_form(path: Path) -> None:
    st.subheader("1 · The probe image")
    st.caption("The run draws the attention each of its layers gives to this image every few seconds.")
    c1, c2 = st.columns([3, 1])
    with c1:
        probe = pickers.image_source(key="probe")
    if probe is not None:
        c2.image(probe.data, caption=probe.name, width=128)
    with st.form("train_form"):
        st.subheader("2 · The model and the run")
        c1, c2, c3, c4 = st.columns(4)
        model = c1.selectbox("Model", runs.TRAIN_MODELS, index=runs.TRAIN_MODELS.index(FORM["model"]),
                             key="train_model",
                             help="sa_cnn: convolutions with self-attention; hybrid_vit: a small transformer; "
                                  "cbam_cnn: SE and CBAM attention; seed_cnn: a plain CNN.")
        epochs = c2.number_input("Epochs", 1, runs.MAX_EPOCHS, FORM["epochs"], key="train_epochs")
        width = c3.select_slider("Width (channels of the first stage)", [16, 32, 64], FORM["width"], key="train_width")
        subset = c4.number_input("Training images", 0, 50000, FORM["subset"], step=5000, key="train_subset",
                                 help=f"Fewer images train faster; at least {runs.MIN_IMAGES} (one batch).")
        c1, c2, c3, c4 = st.columns(4)
        heads = c1.select_slider("Attention heads", [1, 2, 4, 8], FORM["heads"], key="train_heads")
        similarity = c2.selectbox("Similarity (sa_cnn)", SIMILARITIES, index=SIMILARITIES.index(FORM["similarity"]),
                                  key="train_similarity")
        pos = c3.selectbox("Positional encoding (sa_cnn)", POS_ENCODINGS,
                           index=POS_ENCODINGS.index(FORM["pos_encoding"]), key="train_pos")
        st.session_state.setdefault("train_name", f"run_{time.strftime('%m%d_%H%M')}")
        name = c4.text_input("Run name", key="train_name", max_chars=40,
                             help="letters, digits, - and _; the run writes runs/NAME.safetensors")
        choice = st.selectbox("Experiment", [None, *(e.key for e in experiments.EXPERIMENTS)], key="train_experiment",
                              format_func=experiment_label,
                              help="An experiment trains one run per value of one setting, one after the other, "
                                   "and shows them side by side (NAME-value each).")
        submitted = st.form_submit_button("Start training", type="primary", key="train_start")
    if submitted:
        with state.guard("starting the run"):
            if probe is None:
                raise VisattnError("choose a probe image first (a test image or an upload)")
            form = {"model": model, "epochs": int(epochs), "width": int(width), "heads": int(heads),
                    "similarity": similarity, "pos_encoding": pos, "subset": int(subset),
                    "eval_subset": FORM["eval_subset"]}
            name = name.strip()
            plan = experiments.experiment_runs(experiments.experiment(choice), name, form) if choice else [(name, form)]
            probe_file = paths.runs() / f"{name}.probe.png"
            argvs = [(n, runs.train_argv(n, **f, data=path, probe=str(probe_file))) for n, f in plan]
            runs.check_free([n for n, _ in argvs])  # before the probe file of a running run is replaced
            runs.save_probe_image(name, probe.data)
            proc = runs.start_training(*argvs[0]) if len(argvs) == 1 else runs.start_in_turn(argvs)
            st.session_state["train_watch"] = [runs.run_label(n) for n, _ in argvs]
            st.success(f"Started {', '.join(n for n, _ in argvs)} (process {proc.pid}).")


def experiment_label(key: str | None) -> str:
    if key is None:
        return "none: one run with these settings"
    e = experiments.experiment(key)
    return f"{e.question} ({' vs '.join(map(str, e.values))})"


def watch(running: dict[str, int]) -> None:
    st.header("Watch")
    files = runs.metric_files()
    if not files:
        st.info("No runs yet: start one above.")
        return
    chosen = [label for label in st.session_state.get("train_watch") or [] if label in files]
    st.session_state["train_watch"] = chosen or [next(iter(files))]
    picked = st.multiselect("Runs (pick several to compare them)", list(files), key="train_watch",
                            help="runs/ holds runs started here; checkpoints/ the shipped models' training")
    live = bool(running) and any((runs.read_run(files[label]).status or {}).get("phase") not in FINAL
                                 for label in picked)

    @st.fragment(run_every=2 if live else None)
    def monitor() -> None:
        now = runs.running()
        if now.keys() != running.keys():
            st.rerun(scope="app")  # a run started or ended: its checkpoint in the sidebar, the Stop buttons
        with state.guard("the run monitor"):
            records = {label: runs.read_run(files[label]) for label in picked}
            if len(records) == 1:
                label, record = next(iter(records.items()))
                show_run(label, record, is_alive(label, record, now), files[label])
            elif records:
                compare_runs(records, now)

    monitor()


def is_alive(label: str, record: runs.RunRecord, now: dict[str, int]) -> bool:
    """Whether the run's process runs (a run waiting for its turn: whether its experiment does)."""
    waiting = (record.status or {}).get("phase") == "waiting"
    return runs.run_name(label) in now or (waiting and bool(now))


def progress(record: runs.RunRecord, alive: bool) -> None:
    fraction, text = runs.progress_line(record.status, alive)
    st.progress(fraction, text=text)


def show_run(label: str, record: runs.RunRecord, alive: bool, metrics: Path) -> None:
    if record.status:
        progress(record, alive)
    trained = [r for r in record.steps if "loss" in r] or record.epochs
    if not trained:
        st.info("Waiting for the first numbers…")
    else:
        last = trained[-1]
        c = st.columns(4)
        c[0].metric("Loss", f"{last.get('loss', float('nan')):.3f}")
        c[1].metric("Train accuracy", f"{last.get('train_acc', 0):.1%}")
        c[2].metric("Test accuracy", f"{record.epochs[-1]['test_acc']:.1%}" if record.epochs else "after epoch 1")
        c[3].metric("Speed", f"{last.get('img_per_s', 0):.0f} img/s")
        controls.show_fig(figures.runs_figure({label: record}), key="train_curves")
    probe_maps(label, record, live=alive and (record.status or {}).get("phase") not in FINAL)
    open_in_explore(metrics, record)
    stem = metrics.name.removesuffix(".metrics.jsonl")
    text = runs.tail(metrics.with_name(stem + ".log")) or runs.tail(paths.runs() / f"{stem}.log")
    if text:
        with st.expander("Log (last lines)"):
            st.code(text, language=None)


def probe_maps(label: str, record: runs.RunRecord, live: bool) -> None:
    """The attention every layer gives the probe image, at the latest probe (or one chosen)."""
    probes = record.probes()
    if not probes:
        if record.epochs:
            st.caption("This model has no self-attention, so there is no attention map to follow.")
        return
    st.subheader("Its attention on the probe image")
    steps = [s for s, _ in probes]
    step = steps[-1] if live or len(steps) == 1 else st.select_slider(
        "Training step", steps, value=steps[-1], key=f"probe_step_{label}")
    image = runs.probe_picture(record.probe_image, probe_split(record.probe_image))
    st.caption(f"At step {step}: the attention each position receives (averaged over heads and queries), brighter "
               "is more. Entropy: how spread the attention rows are, averaged over 16 images; uniform attention "
               "has log N.")
    layers = dict(probes)[step]
    for col, (name, layer) in zip(st.columns(max(len(layers), 2)), layers.items()):
        draw_map(col, image, layer, name)


def draw_map(col, image: np.ndarray | None, layer: dict, title: str) -> None:
    m = maps.normalise(np.asarray(layer["received"], dtype=np.float32))
    cmap = st.session_state["cmap"]
    picture = figures.overlay_large(image, m, 0.6, cmap, size=224) if image is not None else \
        figures.overlay_large(np.zeros((32, 32, 3), np.uint8), m, 1.0, cmap, size=224)
    entropy = f" · entropy {layer['entropy']:.2f} of log N = {layer['uniform']:.2f}" if "entropy" in layer else ""
    col.image(picture)
    col.caption(f"{title}{entropy}")


def probe_split(spec: str):
    return pickers.test_split_or_none() if spec.isdigit() else None


def open_in_explore(metrics: Path, record: runs.RunRecord) -> None:
    """A button that opens the run's checkpoint in Explore (the sidebar picker set to it)."""
    ckpt = metrics.with_name(metrics.name.removesuffix(".metrics.jsonl") + ".safetensors")
    if not ckpt.is_file() or not record.epochs:
        return

    def choose() -> None:  # before the next run draws the sidebar
        st.session_state["model_source"] = pickers.MODEL_SOURCES[0]
        st.session_state["checkpoint_label"] = f"{metrics.parent.name}/{ckpt.name}"
        st.session_state["train_open_explore"] = True

    st.button("Open in Explore", key=f"explore_{ckpt.name}", on_click=choose,
              help="the sidebar's model picker switches to this checkpoint")


def compare_runs(records: dict[str, runs.RunRecord], now: dict[str, int]) -> None:
    """Runs side by side: progress, overlaid curves, final test accuracies and their
    differences, and the last probe of each run's last attention layer."""
    for label, record in records.items():
        st.caption(label)
        progress(record, is_alive(label, record, now))
    controls.show_fig(figures.runs_figure(records), key="train_compare")
    cols = st.columns(len(records))
    first = next(iter(records.values()))
    base = first.epochs[-1]["test_acc"] if first.epochs else None
    for col, (label, record) in zip(cols, records.items()):
        with col:
            acc = record.epochs[-1]["test_acc"] if record.epochs else None
            delta = f"{100 * (acc - base):+.1f} points" if acc is not None and base is not None and record is not first \
                else None
            st.metric(f"{label} · test accuracy", f"{acc:.1%}" if acc is not None else "not yet", delta)
            probes = record.probes()
            if probes:
                name, layer = list(probes[-1][1].items())[-1]
                draw_map(st, runs.probe_picture(record.probe_image, probe_split(record.probe_image)), layer, name)


if __name__ == "__main__":  # a fresh server's first request for /train (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
