"""Pictures of MEKD runs: generated images per teacher class, and the GAN diagnostics per epoch.

    python benchmarks/mekd_plots.py --run RUN_DIR --teacher TEACHER_DIR \\
        --samples docs/mekd_samples.png --diagnostics docs/mekd_diagnostics.png [--curve RUN ...]

--run is an mekd run directory or its checkpoint file (with --dataset then); --curve a run
directory or a metrics.jsonl file.

The samples grid draws latents as the run's transfer set does (N(0, I), or with
`options.latents=answers` the run's answers on edge images / tau_g plus noise, read from its
checkpoint), generates images with
the run's final generator (eval mode, as distillation uses it) and sorts them by the local
teacher's argmax: one row per class, `--per-class` images in the order drawn (not hand-picked),
the row title giving the class's share of the draws. The teacher is asked locally, for the picture
only. The diagnostics plot reads the metrics.jsonl of `--run` and every `--curve` run: the
discriminator's accuracy, the teacher's mean top probability and the classes its argmax covers on
the fixed diagnostic batch, per GAN epoch. Existing output files are not overwritten
(`--force` to replace them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from distillkit.data.datasets import load_dataset
from distillkit.data.transforms import normalize
from distillkit.methods.mekd import Generator, MEKDOptions, read_run_weights
from distillkit.methods.mekd_gan import answer_latents
from distillkit.models.checkpoint import model_from_checkpoint


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="an mekd run directory or checkpoint file")
    p.add_argument("--teacher", required=True, help="the teacher run directory (labels the grid)")
    p.add_argument("--dataset", default=None, help="default: the run's dataset")
    p.add_argument("--samples", default=None, help="PNG of generated images per class")
    p.add_argument("--diagnostics", default=None, help="PNG of the GAN diagnostics per epoch")
    p.add_argument("--curve", action="append", default=[], help="more runs for the diagnostics")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--draws", type=int, default=4000)
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--title", default=None, help="samples title (default: the run's name)")
    p.add_argument("--labels", default=None, help="comma-separated curve labels")
    return p.parse_args()


def load_generator(run: Path, bundle) -> Generator:
    """The run's final generator (width read from its weights), in eval mode."""
    weights = read_run_weights(str(run))
    part = {k[len("generator.") :]: v for k, v in weights.items() if k.startswith("generator.")}
    width = part["bn0.weight"].shape[0]
    g = Generator(bundle.num_classes, bundle.in_channels, bundle.image_size, width)
    g.load_state_dict(part)
    return g.eval()


def draw_latents(run: Path, n: int, k: int) -> torch.Tensor:
    """n latents as the run's transfer set draws them (seeded: the same picture every time)."""
    gen = torch.Generator().manual_seed(0)
    config = (run if run.is_dir() else run.parent.parent) / "config.yaml"
    if not config.is_file():  # options unknown: the paper's N(0, I)
        return torch.randn(n, k, generator=gen)
    opts = yaml.safe_load(config.read_text()).get("options") or {}
    o = MEKDOptions(**opts).resolved(opts.get("response", "soft"))
    if o.latents != "answers":
        return torch.randn(n, k, generator=gen)
    answers = read_run_weights(str(run), "extra_state")["edge_t"]
    return answer_latents(answers, n, o.latent_noise, o.g_input, o.tau_g, gen)


def samples_grid(args: argparse.Namespace, out: Path) -> None:
    """Generated images sorted by the teacher's class, one row per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(args.run)
    name = args.dataset or json.loads((run / "metrics.json").read_text()).get("dataset", "digits")
    title = args.title or run.name
    bundle = load_dataset("fashion-mnist" if name.startswith("fashion-mnist") else name)
    g = load_generator(run, bundle)
    teacher, _ = model_from_checkpoint(args.teacher)
    z = draw_latents(run, args.draws, bundle.num_classes)
    with torch.no_grad():
        pixels = (g(z) + 1.0) * 0.5
        labels = teacher(normalize(pixels, bundle.mean, bundle.std)).argmax(1)
    k, n = bundle.num_classes, args.per_class
    fig, axes = plt.subplots(k, n, figsize=(n * 0.8, k * 0.9))
    for c in range(k):
        idx = (labels == c).nonzero().flatten()[:n]
        share = 100.0 * float((labels == c).float().mean())
        for j in range(n):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(idx):
                img = pixels[idx[j]].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
                ax.imshow(img, cmap="gray" if bundle.in_channels == 1 else None)
        axes[c, 0].set_title(f"{bundle.classes[c]} ({share:.0f}%)", fontsize=7, loc="left", pad=2)
    fig.suptitle(f"MEKD generator, images by teacher class: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def metrics_rows(run: Path) -> list[dict]:
    """metrics.jsonl rows of a run directory or of the file itself."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def diagnostics_plot(runs: list[Path], out: Path, labels: list[str]) -> None:
    """D accuracy, teacher top probability and classes covered per GAN epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("gan_d_acc", "D accuracy, real vs fake (%)"),
        ("gan_top_prob", "teacher's mean top probability on G(z)"),
        ("gan_classes", "teacher classes covered by G(z)"),
        ("gan_class_entropy", "entropy of the teacher's class histogram (nats)"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    for i, (run, label) in enumerate(zip(runs, labels)):
        rows = metrics_rows(run)
        for ax, (key, title) in zip(axes, keys):
            pts = [(r["epoch"], r[key]) for r in rows if key in r]
            if pts:  # one colour per run in every panel (hard answers have no top probability)
                ax.plot(*zip(*pts), marker="o", ms=3, label=label, color=f"C{i}")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("GAN epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    """Write the requested pictures; refuse to replace existing files without --force."""
    args = parse_args()
    torch.set_num_threads(1)
    for path in filter(None, (args.samples, args.diagnostics)):
        if Path(path).exists() and not args.force:
            print(f"error: {path} exists (use --force to replace it)", file=sys.stderr)
            return 2
    curves = [Path(r) for r in ([args.run] if Path(args.run).is_dir() else []) + args.curve]
    for run in curves:
        if not (run / "metrics.jsonl" if run.is_dir() else run).is_file():
            print(f"error: {run} holds no metrics.jsonl", file=sys.stderr)
            return 2
    if not Path(args.run).is_dir() and not args.dataset:
        print("error: --run is a checkpoint file: give --dataset", file=sys.stderr)
        return 2
    labels = args.labels.split(",") if args.labels else [r.name for r in curves]
    if len(labels) != len(curves):
        print(f"error: {len(labels)} --labels for {len(curves)} curves", file=sys.stderr)
        return 2
    if args.samples:
        samples_grid(args, Path(args.samples))
    if args.diagnostics:
        diagnostics_plot(curves, Path(args.diagnostics), labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
