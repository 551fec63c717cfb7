"""fastai_groups.plots: the CLI's compare.png (integer epochs, frozen epochs shown) and group_lr from a saved CSV."""
import matplotlib
import pandas as pd
import pytest

from fastai_groups.plots import phase_names, plot_compare, plot_group_lr

matplotlib.use("Agg")


def test_compare_plot_integer_epochs_and_frozen_span():
    import matplotlib.pyplot as plt
    fig = plot_compare({"fine_tune": [0.4, 0.55, 0.6], "unfrozen": [0.5, 0.52, 0.61]}, freeze_epochs=1, title="t")
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    span = [p for p in ax.patches if p.get_gid() == "frozen"]
    assert len(span) == 1
    x0, x1 = span[0].get_x(), span[0].get_x() + span[0].get_width()
    assert (x0, x1) == (0.5, 1.5)                          # epoch 1 is the frozen one
    assert [t.get_text() for t in ax.texts] == ["fine_tune:\nbody frozen (1 epoch)"]
    assert [l.get_label() for l in ax.get_lines()] == ["fine_tune", "unfrozen"]
    plt.close(fig)
    for curves, k in (({"fine_tune": [0.5, 0.6]}, 0), ({"unfrozen": [0.5, 0.6]}, 1)):   # nothing frozen: no span
        fig = plot_compare(curves, freeze_epochs=k)
        assert not [p for p in fig.axes[0].patches if p.get_gid() == "frozen"]
        plt.close(fig)


def _history(states_per_fit):
    "A GroupLogger-like history: 2 groups, 3 iterations per fit, states given per fit."
    rows, it = [], 0
    for fit, states in enumerate(states_per_fit):
        for _ in range(3):
            for g, st in enumerate(states):
                rows.append(dict(iter=it, epoch=0, fit=fit, group=g, name=["body", "head"][g], lr=1e-3 * 10 ** g,
                                 params=10, trainable=10 if st == "trainable" else 0, state=st))
            it += 1
    return pd.DataFrame(rows)


def test_group_lr_plot_from_a_csv_history(tmp_path):
    import matplotlib.pyplot as plt
    df = _history([("frozen", "trainable"), ("trainable", "trainable")])
    df.to_csv(tmp_path / "g.csv", index=False)
    back = pd.read_csv(tmp_path / "g.csv")
    assert phase_names(back) == {0: "frozen (1 of 2 groups trains)", 1: "unfrozen (all 2 groups train)"}
    fig = plot_group_lr(back)                                 # no epochs: lr panel and freeze map only
    assert len(fig.axes) == 2
    styles = {l.get_gid(): l.get_linestyle() for l in fig.axes[0].get_lines() if l.get_gid()}
    assert styles["lr:0:frozen"] == ":" and styles["lr:0:trainable"] == "-" and styles["lr:1:trainable"] == "-"
    plt.close(fig)
    with pytest.raises(ValueError, match="recorded nothing yet: train first"):
        plot_group_lr(back.iloc[:0])
