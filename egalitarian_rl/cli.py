"""The ``egalitarian-rl`` command: ``demo``, ``run CONFIG.yaml``, the pipeline's stages and ``frontier``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

SHIPPED_CONFIGS = ("fairgrid", "halfcheetah", "hopper", "reacher", "fairgrid_online", "halfcheetah_online", "imdb", "imdb_quick")


def _config_path(name_or_path: str) -> Path:
    """A config file, or the name of a shipped one (``fairgrid``, ``halfcheetah``)."""
    if name_or_path in SHIPPED_CONFIGS:
        return Path(str(resources.files("egalitarian_rl.experiments") / "configs" / f"{name_or_path}.yaml"))
    return Path(name_or_path)


def _load(args: argparse.Namespace):
    from egalitarian_rl.experiments import ExperimentConfig, Pipeline
    from egalitarian_rl.experiments.config import ConfigError, is_lm_config

    path = _config_path(args.config)
    # "module:function" rewards and groups_from may live next to the config or in the working directory.
    for folder in (str(Path.cwd()), str(path.parent.resolve())):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    force = getattr(args, "force", None) or ()
    if is_lm_config(path):  # a language experiment (model + prompts) runs through the same stage commands
        from egalitarian_rl.experiments.lm_pipeline import LMExperimentConfig, LMPipeline

        lm_config = LMExperimentConfig.from_yaml(path)
        if getattr(args, "out", None):
            lm_config.out_dir = args.out
        if getattr(args, "seeds", None):
            if len(args.seeds) != 1:
                raise ConfigError("--seeds: a language experiment runs one seed at a time; give one")
            lm_config.seed = args.seeds[0]
        return LMPipeline(lm_config, progress_bar=not args.no_progress, force=force)
    config = ExperimentConfig.from_yaml(path)
    if getattr(args, "out", None):
        config.out_dir = args.out
    if getattr(args, "seeds", None):
        config.seeds = args.seeds
    return Pipeline(config, progress_bar=not args.no_progress, force=force)


def _run(args: argparse.Namespace) -> int:
    pipeline = _load(args)
    report, metrics = pipeline.run()
    if "em_ari" in metrics:  # a language experiment: its own tables
        from egalitarian_rl.experiments.lm_pipeline import format_tables

        print(format_tables(metrics, pipeline.group_names))
    print(f"\nreport: {report}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.config = "fairgrid"
    return _run(args)


def _assign(args: argparse.Namespace) -> int:
    from egalitarian_rl.preferences import PreferenceDataset

    pipeline = _load(args)
    answers = PreferenceDataset.load(args.answers)
    threshold = pipeline.config.reward.min_confidence
    for decision in pipeline.assign(args.seed, answers):
        head = f"user {decision['user']} ({decision['n_comparisons']} answers):"
        if decision["member"] is None:
            print(f"{head} not personalised: {decision['best_member']} at {decision['confidence']:.2f} < {threshold:.2f}; serve maxmin")
        else:
            print(f"{head} {decision['member']} (confidence {decision['confidence']:.2f})")
    return 0


def _label(args: argparse.Namespace) -> int:
    from egalitarian_rl.labelling.campaign import label_main

    return label_main(args.config, host=args.host, port=args.port, export=args.export)


def _frontier(args: argparse.Namespace) -> int:
    from egalitarian_rl.experiments import Pipeline
    from egalitarian_rl.experiments.config import ConfigError
    from egalitarian_rl.experiments.frontier import FrontierPipeline, weight_grid

    weight_grid(args.points)  # refuse a bad --points before any work
    pipeline = _load(args)
    if not isinstance(pipeline, Pipeline):
        raise ConfigError(f"{args.config}: the frontier needs an env experiment (env_id and two groups), not a language experiment")
    frontier = FrontierPipeline(pipeline.config, progress_bar=pipeline.progress_bar)
    path = frontier.frontier(args.points, force=args.redo)
    print(f"frontier: {path} and {path.with_name('frontier.png')}")
    return 0


def _stage(stage: str):
    def handler(args: argparse.Namespace) -> int:
        pipeline = _load(args)
        if stage == "report":
            print(f"report: {pipeline.report()}")
            return 0
        for seed in pipeline.config.seeds:
            if stage in ("collect", "fit"):
                getattr(pipeline, stage)(seed)
            else:
                for method in pipeline.methods:
                    getattr(pipeline, stage)(seed, method)
        print(f"{stage}: done, artefacts in {pipeline.out_dir}")
        return 0

    return handler


STAGES = {
    "collect": "simulated users compare segments -> seed_<s>/preferences.npz",
    "fit": "fit the single Bradley-Terry reward and the EM mixture -> seed_<s>/rewards/",
    "train": "train every method's policy -> seed_<s>/policies/",
    "evaluate": "every group's true return of every policy -> seed_<s>/returns/",
    "report": "metrics.json, report.md and plots from the evaluations",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egalitarian-rl",
        description="MaxMin-RLHF on any Gymnasium env: preferences from diverse users -> EM reward mixture -> "
        "a policy for the worst-off group, compared with single-reward RLHF.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, with_config: bool = True) -> None:
        if with_config:
            sub.add_argument("config", help=f"YAML config file, or a shipped one: {', '.join(SHIPPED_CONFIGS)}")
        sub.add_argument("--out", help="output folder (overrides the config's out_dir)")
        sub.add_argument("--seeds", type=int, nargs="+", help="seeds to run (overrides the config)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        if with_config:
            sub.add_argument(
                "--force",
                action="append",
                choices=["collect", "fit", "train", "evaluate"],
                metavar="STAGE",
                help="redo STAGE (collect, fit, train or evaluate) even if its saved artefacts are up to date; "
                "later stages follow. Repeatable.",
            )

    demo = commands.add_parser("demo", help="the FairGrid pipeline end to end (a few minutes on 2 CPU cores)")
    common(demo, with_config=False)
    demo.set_defaults(handler=_demo)
    run = commands.add_parser("run", help="every stage of a config, resuming from saved artefacts")
    common(run)
    run.set_defaults(handler=_run)
    assign = commands.add_parser(
        "assign",
        help="put new users (a preferences .npz) in a group of a run's mixture, or refuse below reward.min_confidence",
    )
    common(assign)
    assign.add_argument("answers", help="the new users' comparisons: a PreferenceDataset .npz")
    assign.add_argument("--seed", type=int, default=0, help="whose mixture (default 0)")
    assign.set_defaults(handler=_assign)
    for stage, text in STAGES.items():
        sub = commands.add_parser(stage, help=text, description=f"{text}. Earlier stages run first if their artefacts are missing.")
        common(sub)
        sub.set_defaults(handler=_stage(stage))
    frontier = commands.add_parser(
        "frontier",
        help="train one policy per fixed group weighting (true and learned rewards) -> frontier.json, frontier.png",
        description="The fairness frontier of a two-group config: one policy per weight vector (w, 1 - w) on a grid, "
        "trained on the groups' true rewards and on the learned EM rewards, scored by every group's true return, with "
        "the run's methods (metrics.json, if any) marked on it. Reuses the run's preferences and fitted rewards "
        "(collecting and fitting first if missing) and every saved up-to-date point; adds a section to report.md.",
    )
    common(frontier, with_config=False)
    frontier.add_argument("config", help=f"YAML config file, or a shipped one: {', '.join(SHIPPED_CONFIGS)}")
    frontier.add_argument("--points", type=int, default=9, help="weights on the grid, from all on group 1 to all on group 2 (default 9)")
    frontier.add_argument(
        "--force",
        dest="redo",
        action="store_true",
        help="retrain every frontier point even if saved (the preferences and rewards are reused)",
    )
    frontier.set_defaults(handler=_frontier)
    label = commands.add_parser("label", help="serve a labelling web page for one campaign: people compare pairs, answers go to SQLite")
    label.add_argument("config", help="the campaign's YAML file (README: 'Labelling with people')")
    label.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    label.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    label.add_argument("--export", metavar="FILE.npz", help="write the answers so far as a PreferenceDataset and exit")
    label.set_defaults(handler=_label)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from egalitarian_rl.experiments.config import ConfigError
    from egalitarian_rl.preferences import PreferenceDatasetError

    try:
        return args.handler(args)
    except (ConfigError, PreferenceDatasetError, FileNotFoundError, ValueError) as err:
        # A user's mistake (a bad config, a corrupt file, a group reward returning NaN): one clear line, no traceback.
        message = " ".join(str(err).split())
        print(f"egalitarian-rl: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # A model that cannot be loaded offline: one line too (imported lazily: transformers is slow to import).
        from egalitarian_rl.lm.models import ModelLoadError

        if not isinstance(err, ModelLoadError):
            raise
        print(f"egalitarian-rl: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("egalitarian-rl: interrupted; finished stages are saved and will be reused", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
