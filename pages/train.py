"""Train: start a small training run in the background and watch it learn, epoch by epoch."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import streamlit as st

from pages import _controls as controls, _state as state
from visattn import paths
from visattn.app import figures, runs, views
from visattn.errors import VisattnError
from visattn.models.attention import POS_ENCODINGS, SIMILARITIES


def main() -> None:
    st.title("Train a model")
    st.markdown("Train a small model on the CIFAR-10 training set in the background, watch its loss and accuracy, "
                "and see its attention sharpen epoch by epoch. Finished checkpoints land in runs/ and appear in the "
                "sidebar's model picker.")

    path = paths.data()
    have_data = views.data_available(path)
    if not have_data:
        st.info(f"The data set is not available at {path}: training needs it (set VISATTN_DATA to an image-folder "
                "data set with train/ and test/). You can still watch earlier runs below.")

    with st.form("train_form"):
        c1, c2, c3, c4 = st.columns(4)
        model = c1.selectbox("Model", runs.TRAIN_MODELS, key="train_model",
                             help="sa_cnn: convolutions with self-attention; hybrid_vit: a small transformer; "
                                  "cbam_cnn: SE and CBAM attention; seed_cnn: a plain CNN.")
        epochs = c2.number_input("Epochs", 1, runs.MAX_EPOCHS, 2, key="train_epochs")
        width = c3.select_slider("Width (channels of the first stage)", [16, 32, 64], 32, key="train_width")
        subset = c4.number_input("Training images (0 = all 50,000)", 0, 50000, 5000, step=1000, key="train_subset",
                                 help="Fewer images train faster; at least 512 (one batch).")
        c1, c2, c3, c4 = st.columns(4)
        heads = c1.select_slider("Attention heads", [1, 2, 4, 8], 4, key="train_heads")
        similarity = c2.selectbox("Similarity (sa_cnn)", SIMILARITIES, key="train_similarity")
        pos = c3.selectbox("Positional encoding (sa_cnn)", POS_ENCODINGS, index=POS_ENCODINGS.index("sinusoidal"),
                           key="train_pos")
        st.session_state.setdefault("train_name", f"run_{time.strftime('%m%d_%H%M')}")
        name = c4.text_input("Run name", key="train_name", max_chars=48,
                             help="letters, digits, - and _; the run writes runs/NAME.safetensors")
        submitted = st.form_submit_button("Start training", type="primary", disabled=not have_data)
    if submitted:
        with state.guard("starting the run"):
            if subset and subset < 512:
                raise VisattnError("at least 512 training images (one batch), or 0 for all")
            argv = runs.train_argv(name.strip(), model, int(epochs), int(width), int(heads), similarity, pos,
                                   int(subset), data=path)
            proc = runs.start_training(name.strip(), argv)
            st.session_state["train_pending"] = f"runs/{name.strip()}"  # shown once its metrics file exists
            st.success(f"Started {name.strip()} (process {proc.pid}).")
            st.code(" ".join(argv[1:]), language="bash")

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

    st.header("Watch a run")
    files = runs.metric_files()
    if not files:
        st.info("No metrics yet: start a run above (the default model's training also writes "
                "checkpoints/sa_cnn.metrics.jsonl).")
        st.stop()
    pending = st.session_state.get("train_pending")
    if pending in files:
        st.session_state["train_monitor"] = pending
        del st.session_state["train_pending"]
    elif pending:
        st.info(f"{pending} is loading the data set; its curves appear here as soon as it writes its first numbers.")
    label = state.persistent(st.selectbox, "Run", "train_monitor", options=list(files),
                             help="runs/ holds runs started here; checkpoints/ the shipped models' training")
    fresh = time.time() - files[label].stat().st_mtime < 120  # written in the last two minutes: probably training
    live = st.toggle("Live update every 2 s", value=bool(running) or fresh or bool(pending), key=f"train_live_{label}")


    @st.fragment(run_every=2 if live else None)
    def monitor() -> None:
        if running and runs.running().keys() != running.keys():
            st.rerun(scope="app")  # a run ended: refresh the Stop buttons and the sidebar's checkpoints
        if pending and pending not in files and pending in runs.metric_files():
            st.rerun(scope="app")  # the new run wrote its first metrics: switch to it
        with state.guard("the run monitor"):
            show_run(files[label])


    def show_run(metrics: Path) -> None:
        steps, epochs_done = runs.read_metrics(metrics)
        if not steps and not epochs_done:
            st.info("Waiting for the first numbers (the data set is loaded first)…")
        else:
            last = steps[-1] if steps else epochs_done[-1]
            total = last.get("total_steps")
            if total:
                st.progress(min(1.0, last.get("step", 0) / total),
                            text=f"epoch {last.get('epoch')} · step {last.get('step')} of {total}")
            c = st.columns(4)
            c[0].metric("Loss", f"{last.get('loss', float('nan')):.3f}")
            c[1].metric("Train accuracy", f"{last.get('train_acc', 0):.1%}")
            c[2].metric("Test accuracy", f"{epochs_done[-1]['test_acc']:.1%}" if epochs_done else "after epoch 1")
            c[3].metric("Speed", f"{last.get('img_per_s', 0):.0f} img/s")
            controls.show_fig(figures.curves_figure(steps, epochs_done), key="train_curves")
        probes = [(e["epoch"], e["probe"]) for e in epochs_done if e.get("probe")]
        if probes:
            st.subheader("Its attention, epoch by epoch")
            st.caption("The attention each position of test image 0 receives in the last attention layer "
                       "(averaged over heads and queries), at the end of each epoch.")
            epochs_list = [e for e, _ in probes]
            chosen = epochs_list[-1] if len(epochs_list) == 1 else st.select_slider(
                "Epoch", epochs_list, value=epochs_list[-1], key=f"probe_epoch_{label}")
            probe = np.asarray(dict(probes)[chosen], dtype=np.float32)
            c1, _ = st.columns([1, 1])
            with c1:
                controls.show_fig(figures.heatmap_figure(probe, f"epoch {chosen}", "attention received", None,
                                                         st.session_state["cmap"], height=420), key="train_probe")
        elif epochs_done:
            st.caption("This model has no self-attention, so there is no attention map to follow.")
        stem = metrics.name.removesuffix(".metrics.jsonl")
        text = runs.tail(metrics.with_name(stem + ".log")) or runs.tail(paths.runs() / f"{stem}.log")
        if text:
            with st.expander("Log (last lines)"):
                st.code(text, language=None)


    monitor()



if __name__ == "__main__":  # a fresh server's first request for /train (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
