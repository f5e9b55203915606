"""A run's metrics: out_dir/metrics.jsonl as train.py writes it, and its loss curves drawn.

MetricsLog appends one JSON object per log step and per evaluation (iter, elapsed_s, and the
numbers), flushed at once so a killed run's file holds what it logged; a resumed run keeps the
records up to its checkpoint. With tensorboard_log or wandb_log the same records go there too.
plot() draws the logged training loss and the evaluations' train and val losses into
out_dir/loss.png (train.py --plot).
"""
import json
from pathlib import Path

from common import UserError, atomic_write_text, pyplot, save_figure


class MetricsLog:
    """out_dir/metrics.jsonl, one JSON object per line; optionally TensorBoard and W&B too.

    A new run starts the file afresh. A resumed one keeps the records up to its checkpoint's
    iteration and drops the rest: a run killed without a checkpoint logged iterations that the
    resumed run does again, and a kill mid-write leaves half a line."""

    def __init__(self, path, cfg, resume_iter=None):
        kept = []
        if resume_iter is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["iter"] <= resume_iter:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # the half-written last line of a killed run
        atomic_write_text(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")
        self.tensorboard = self.wandb = None
        self.samples = []  # W&B: (iter, text) of every sample logged
        if cfg["tensorboard_log"]:
            from torch.utils.tensorboard import SummaryWriter  # checked by check_logging_packages
            self.tensorboard = SummaryWriter(Path(cfg["out_dir"]) / "tensorboard")
        if cfg["wandb_log"]:
            import wandb
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    def write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = {k: v for k, v in record.items() if k not in ("iter", "elapsed_s")}
        if self.tensorboard:
            for k, v in values.items():
                if isinstance(v, str):  # a sample of the model's text
                    self.tensorboard.add_text(k, v, record["iter"])
                else:
                    self.tensorboard.add_scalar(k, v, record["iter"])
        if self.wandb:
            if "sample" in values:  # one table of every sample so far, a row per evaluation
                import wandb
                self.samples.append([record["iter"], values["sample"]])
                values = values | {"sample": wandb.Table(columns=["iter", "sample"], data=self.samples)}
            self.wandb.log(values, step=record["iter"])

    def close(self):
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def plot(out_dir):
    """Draw out_dir/metrics.jsonl's loss curves into out_dir/loss.png."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: train first, or pass the out_dir of a run")
    plt = pyplot()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["iter"] for r in logs], [r["loss"] for r in logs], label="train (logged)", alpha=0.5)
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set(xlabel="iteration", ylabel="loss", title=str(out_dir))
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, Path(out_dir) / "loss.png")  # atomic, and closed after
    print(f"wrote {Path(out_dir) / 'loss.png'}")
