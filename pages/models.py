"""Models: the zoo, and how the chosen model does on the test set: accuracy per class,
confusion matrix, its mistakes with their attention, and statistics of its heads."""
from __future__ import annotations

import streamlit as st

from pages import _controls as controls, _pickers as pickers, _state as state
from visattn import maps, paths
from visattn.app import evaluation, figures, views

HEAD_STAT_IMAGES = 64
MAX_SHOWN = 12


@st.cache_data(max_entries=16, show_spinner=False)
def evaluate(model_key: str, data: str, n: int, _model, _meta, _split):
    return evaluation.evaluate_sample(_model, _meta, _split, n)


@st.cache_data(max_entries=16, show_spinner=False)
def head_stats(model_key: str, data: str, n: int, _model, _meta, _split):
    return evaluation.head_statistics(_model, _meta, _split.subset(n, seed=1).images)


def main() -> None:
    st.title("Models")

    st.header("The zoo")
    checkpoints = views.list_checkpoints()
    if checkpoints:
        st.dataframe(
            [{"checkpoint": label, "model": m.get("model"), "test accuracy": m.get("accuracy"),
              "parameters": m.get("params"),
              "epochs": m.get("epochs"), "classes": len(m.get("classes", [])), "data set": m.get("dataset"),
              "trained on": m.get("hardware"), "date": m.get("date")} for label, m in checkpoints.items()],
            hide_index=True,
            column_config={"test accuracy": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
                           "parameters": st.column_config.NumberColumn(format="localized")})
        st.caption("Checkpoints in checkpoints/ and finished runs in runs/ (the Train page writes there). "
                   "Pick one in the sidebar to study it below.")
    else:
        st.info("No checkpoint yet in checkpoints/ or runs/. The default model appears after its first training epoch.")

    handle = pickers.require_model()
    st.header(f"On the test set: {handle.label}")
    path = paths.data()
    if not views.data_available(path):
        st.info(f"The test set is not available at {path}, so accuracy, the confusion matrix and head statistics "
                "cannot be computed here. Set VISATTN_DATA to an image-folder data set with a test/ split.")
        st.stop()
    split = None
    with state.guard("the test set"):
        split = pickers.test_split_or_none()
    if split is None:
        st.stop()
    if len(handle.meta.get("classes", [])) != len(split.classes):
        st.info(f"This model predicts {len(handle.meta.get('classes', []))} classes; the test set at {path} has "
                f"{len(split.classes)}. Pick a model trained on it to see its accuracy here.")
        st.stop()

    n = st.slider("Test images to evaluate", 100, len(split), min(1000, len(split)), step=100, key="eval_n",
                  help="A fixed random sample; each size is computed once.")
    result = None
    with state.guard("the evaluation"), st.spinner(f"Classifying {n} test images…"):
        result = evaluate(handle.key, str(path), n, handle.model, handle.meta, split)
    if result is None:
        st.stop()
    classes = list(split.classes)
    st.metric("Accuracy on this sample", f"{float(result['accuracy']):.1%}", help=f"{n} test images")
    c1, c2 = st.columns([2, 3])
    with c1:
        controls.show_fig(figures.per_class_figure(result["per_class"], classes), key="models_per_class")
    with c2:
        controls.show_fig(figures.confusion_figure(result["confusion"], classes), key="models_confusion")

    st.header("Look at the mistakes")
    conf = result["confusion"].copy()
    for i in range(len(classes)):
        conf[i, i] = -1
    worst = divmod(int(conf.argmax()), len(classes))
    if "mistake_true" not in st.session_state:
        st.session_state["mistake_true"], st.session_state["mistake_pred"] = worst
    c1, c2 = st.columns(2)
    true = c1.selectbox("True class", range(len(classes)), format_func=lambda i: classes[i], key="mistake_true")
    pred = c2.selectbox("Predicted as", range(len(classes)), format_func=lambda i: classes[i], key="mistake_pred")
    indices = evaluation.misclassified(result, true, pred)
    kind = "correct" if true == pred else "misclassified"
    st.caption(f"{len(indices)} {kind} images in the sample (true {classes[true]}, predicted {classes[pred]}); "
               f"showing up to {MAX_SHOWN}, each with the map the model attends to.")
    alpha, cmap = controls.look_controls()
    if len(indices):
        cols = st.columns(6)
        with st.spinner("Analysing the images…"):
            for j, idx in enumerate(indices[:MAX_SHOWN]):
                data = views.sample_png(split, int(idx))
                choice = pickers.ImageChoice(data, views.sha256(data), f"test image {idx}", true, classes[true])
                analysis = pickers.analysis_for(handle, choice)
                if analysis is None:
                    continue
                shown = views.thumbnail_map(analysis.trace)
                col = cols[j % 6]
                if shown is None:
                    col.image(views.enlarge(analysis.image, 160), caption=f"#{idx} · p={analysis.probs[pred]:.0%}")
                else:
                    what, m = shown
                    col.image(figures.overlay_large(analysis.image, maps.normalise(m), alpha, cmap, size=160),
                              caption=f"#{idx} · p({classes[pred]})={analysis.probs[pred]:.0%} · {what}")

    st.header("What do the heads do?")
    with state.guard("the head statistics"), st.spinner(f"Capturing attention on {HEAD_STAT_IMAGES} test images…"):
        stats = head_stats(handle.key, str(path), HEAD_STAT_IMAGES, handle.model, handle.meta, split)
        if not stats:
            st.info("This model has no self-attention layers, so there are no heads to measure."
                    + (" Its SE and CBAM maps are on the Explore page."
                       if handle.meta.get("model") == "cbam_cnn" else ""))
        else:
            st.markdown(f"Averaged over {HEAD_STAT_IMAGES} test images. **Entropy** is low when a head looks at a few "
                        "places, high (up to the dashed line) when it spreads its attention evenly. **Mean attention "
                        "distance** is how far, in input pixels, a head looks from each query: local heads stay near, "
                        "global heads look across the image.")
            controls.show_fig(figures.head_stats_figure(stats), key="models_heads")



if __name__ == "__main__":  # a fresh server's first request for /models (see pages/__init__.py)
    from pages import main as dashboard

    dashboard()
