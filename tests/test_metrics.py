"""metrics.py: out_dir/metrics.jsonl as a run writes and a resume keeps it, and its loss curves drawn."""
import json
from pathlib import Path

import numpy as np

import metrics
import train
from conftest import require, run_in_process
from test_train import metrics as logged, train_run


def test_a_sample_reaches_tensorboard_as_text_and_numbers_as_scalars(tmp_path):
    """TensorBoard gets a sample with add_text (add_scalar would fail on it), numbers as scalars."""
    calls = []

    class Writer:
        def add_scalar(self, key, value, step):
            calls.append(("scalar", key, step))

        def add_text(self, key, value, step):
            calls.append(("text", key, step))

    log = metrics.MetricsLog(tmp_path / "metrics.jsonl", train.DEFAULTS | {"out_dir": str(tmp_path)})
    log.tensorboard = Writer()
    log.write(iter=5, elapsed_s=1.0, val_loss=2.0, peak_mem_mb=300.0, sample="ROMEO: hi")
    assert calls == [("scalar", "val_loss", 5), ("scalar", "peak_mem_mb", 5), ("text", "sample", 5)]
    log.tensorboard = None
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["sample"] == "ROMEO: hi"


def test_a_resumed_log_keeps_the_records_up_to_its_checkpoint_and_drops_a_half_line(tmp_path):
    """A resumed run's log keeps the records of iterations up to its checkpoint's, in order, and
    drops the later ones (logged again by the resumed run) and a killed writer's half line."""
    path = tmp_path / "metrics.jsonl"
    records = [dict(iter=i, loss=1.0 / i) for i in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 7, "lo')
    log = metrics.MetricsLog(path, train.DEFAULTS | {"out_dir": str(tmp_path)}, resume_iter=4)
    log.write(iter=5, loss=0.5)
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:4] + [dict(iter=5, loss=0.5)]
    metrics.MetricsLog(path, train.DEFAULTS | {"out_dir": str(tmp_path)}).close()  # a new run starts afresh
    assert path.read_text() == ""


def test_plot_draws_the_loss_curves(char_data, out_dir, monkeypatch):
    """train.py --plot draws metrics.jsonl's losses against the iteration into out_dir/loss.png: the
    logged train loss, and each evaluation's train and val loss, each a curve named in the legend."""
    require("matplotlib", reason="train.py --plot draws with matplotlib")
    from matplotlib.figure import Figure

    train_run(char_data, out_dir, "--max_iters=10", "--eval_interval=5", "--log_interval=2")
    saved, savefig = [], Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved.append((fig, str(path)))
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    result = run_in_process(train.main, "--plot", out_dir)
    assert result.returncode == 0, result.stderr
    (fig, path), = saved
    assert Path(path).parent == out_dir  # loss.png's temporary name: written whole, then renamed
    assert (out_dir / "loss.png").read_bytes().startswith(b"\x89PNG") and not Path(path).exists()
    (ax,) = fig.axes
    curves = {line.get_label(): (np.asarray(line.get_xdata()).tolist(), np.asarray(line.get_ydata()).tolist())
              for line in ax.get_lines()}
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(curves)
    logs = [r for r in logged(out_dir) if "loss" in r]
    evals = [r for r in logged(out_dir) if "val_loss" in r]
    assert [r["iter"] for r in logs] == [2, 4, 6, 8, 10] and [r["iter"] for r in evals] == [0, 5, 10]
    assert curves == {"train (logged)": ([r["iter"] for r in logs], [r["loss"] for r in logs]),
                      "train (eval)": ([r["iter"] for r in evals], [r["train_loss"] for r in evals]),
                      "val": ([r["iter"] for r in evals], [r["val_loss"] for r in evals])}
