"""``python -m pipeline <stage>``: the one command line that dvc.yaml and people call.

The parameters are loaded here, once (``--params``, ``--profile``, ``--set``), and the
environment is read here only (``MNIST_SOURCE``, the serving token); stage functions
get a :class:`Config`.
Heavy libraries (torch, GX, onnxruntime) are imported by the stage that needs them, so
``--help`` and ``ingest`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import Config, config_from_dict, load_config, parse_params
from pipeline.core.errors import ConfigError, OrchestrationError, PipelineError

log = logging.getLogger("pipeline")

SOURCE_ENV = "MNIST_SOURCE"


def _ingest(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.data.ingest import ingest

    result = ingest(cfg.data)
    log.info("ingest: %s", result.summary())


def _validate(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.data.validate import run_validation

    result = run_validation(cfg.data.prepared_dir, cfg.validate)
    log.info("validate: %s", result.summary())


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.training.train import run_train_stage

    run_train_stage(cfg, resume=args.resume)
    if args.resume:
        log.warning(
            "train: resumed; record it with `dvc commit --force train` (or resume with "
            "`python -m pipeline resume`), else the next `dvc repro` replaces this model"
        )


def _resume(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.release.dvc_commit import TRAIN_STAGE, dvc_commit, require_dvc_project
    from pipeline.training.train import run_train_stage

    # dvc.lock will claim the model was made from params.yaml: nothing else may differ.
    if args.overrides or args.profile or args.params != Path("params.yaml"):
        raise ConfigError(
            "resume records its result in dvc.lock, which describes params.yaml: run it "
            "without --params/--profile/--set (change parameters with `dvc exp run -S`)"
        )
    require_dvc_project(Path.cwd())
    run_train_stage(cfg, resume=True)
    log.info("resume: %s", dvc_commit(TRAIN_STAGE, Path.cwd()) or "dvc.lock updated")


def _evaluate(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.quality.evaluate import run_evaluate_stage

    run_evaluate_stage(cfg)


def _export(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.handoff.export import run_export_stage

    run_export_stage(cfg)


def _gate(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.release.gate import run_gate_stage

    run_gate_stage(cfg)


def _promote(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.release.promote import promote

    promote(cfg)


def _rollback(cfg: Config, args: argparse.Namespace) -> None:
    if args.to:
        from pipeline.release.registry import rollback_to

        result = rollback_to(cfg, Path.cwd(), args.to, push=not args.no_push)
        log.info("rollback: %s", result.summary())
        return
    from pipeline.release.promote import rollback

    rollback(cfg)


def _recover(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.data.ingest import recover_data
    from pipeline.release.promote import recover_registry

    done = recover_data(cfg.data) + recover_registry(cfg)
    log.info("recover: %s", "; ".join(done) if done else "nothing to do")


def _record(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.release.registry import record

    result = record(cfg, Path.cwd(), push=not args.no_push)
    log.info("record: %s", result.summary())


def _lineage(cfg: Config, args: argparse.Namespace) -> None:
    import json

    from pipeline.release.registry import lineage

    print(json.dumps(lineage(cfg, Path.cwd(), args.version), indent=2, sort_keys=True))


def _remotes(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.release.remotes import check_dvc_remote, check_git_remote

    timeout = cfg.registry.command_timeout_s
    if cfg.registry.git_remote is None:
        log.info("git remote: none configured (registry.git_remote: null), recording locally")
    else:
        url = check_git_remote(Path.cwd(), cfg.registry.git_remote, timeout)
        log.info("git remote %s: %s reachable", cfg.registry.git_remote, url)
    url = check_dvc_remote(Path.cwd(), cfg.registry.dvc_remote, timeout)
    log.info("DVC remote: %s reachable", url)


def _serve(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.serving.server import run_server

    token = os.environ.get(cfg.serve.auth_token_env) or None
    follower = None
    if args.follow:
        from pipeline.serving.follower import follower_from_args

        follower = follower_from_args(cfg, args)
    run_server(
        cfg.serve, cfg.registry, host=args.host, port=args.port, token=token, follower=follower
    )


def _predict(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.serving.predict_cli import predict_files

    predict_files(cfg, [Path(p) for p in args.files], model=args.model)


def _sweep_apply(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.sweep.apply import (
        check_override,
        command_line,
        dvc_exp_command,
        read_override,
        run_command,
    )

    overrides = read_override(args.override)
    repo = Path(args.params).resolve().parent
    check_override(repo, overrides)
    argv = dvc_exp_command(overrides, args.name)
    print(command_line(argv), flush=True)
    if args.dry_run:
        return
    code = run_command(argv, repo)
    if code != 0:
        raise OrchestrationError(f"`{command_line(argv)}` failed with exit status {code}")


Handler = Callable[[Config, argparse.Namespace], None]

STAGES: dict[str, tuple[Handler, str]] = {
    "ingest": (_ingest, "verify, parse and store the four MNIST files"),
    "validate": (_validate, "compute dataset statistics and check them with Great Expectations"),
    "train": (_train, "train the candidate model"),
    "evaluate": (_evaluate, "test-set metrics, confusion matrix, worst mistakes"),
    "export": (_export, "export the candidate to ONNX and check parity with PyTorch"),
    "gate": (_gate, "accept or reject the candidate (exits non-zero on rejection)"),
    "promote": (_promote, "install a gated candidate as the production model"),
    "rollback": (_rollback, "restore the previous production model, or --to any version"),
    "recover": (_recover, "finish interrupted ingest/promote/rollback swaps, remove leftovers"),
    "resume": (_resume, "train --resume, then `dvc commit --force train` (dvc.lock keeps it)"),
    "record": (_record, "commit the promoted model, register its version (GTO), push"),
    "lineage": (_lineage, "one registered version: commit, params, dataset, metrics, gate"),
    "remotes": (_remotes, "check that the git and DVC remotes are configured and reachable"),
    "serve": (_serve, "HTTP inference service on the production model"),
    "predict": (_predict, "classify image files with the production model"),
    "sweep-apply": (_sweep_apply, "run a sweep's best override file as a DVC experiment"),
}


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the stage name."""
    common = argparse.ArgumentParser(add_help=False)

    def d(value: Any) -> Any:
        # Sub-parsers must not reset what was given before the stage name.
        return value if defaults else argparse.SUPPRESS

    common.add_argument(
        "--params", type=Path, default=d(Path("params.yaml")), help="parameters file"
    )
    common.add_argument(
        "--profile",
        default=d(None),
        help="compose the parameters from conf/ with this profile instead of reading "
        "params.yaml (CLI only; DVC does not see it: use `dvc exp run -S profile=...`)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=d([]),
        metavar="KEY=VALUE",
        help="override one parameter, e.g. --set train.epochs=3 (value parsed as YAML)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=d(False), help="debug logging"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="MNIST MLOps pipeline. Parameters come from params.yaml.",
        parents=[_common_options(defaults=True)],
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    common = _common_options(defaults=False)
    parsers = {
        name: sub.add_parser(name, help=text, description=text, parents=[common])
        for name, (_, text) in STAGES.items()
    }
    parsers["train"].add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint"
    )
    parsers["rollback"].add_argument(
        "--to", metavar="VERSION", help="registered version (e.g. v1.2.0): move the stage there"
    )
    for name in ("rollback", "record"):
        parsers[name].add_argument(
            "--no-push", action="store_true", help="record in this checkout only"
        )
    parsers["lineage"].add_argument("version", help="registered version, e.g. v1.2.0")
    parsers["serve"].add_argument(
        "--follow", metavar="GIT_URL", help="serve the registry's stage from this git repository"
    )
    parsers["serve"].add_argument(
        "--dvc-remote-url", help="with --follow: URL of the DVC remote holding the models"
    )
    parsers["serve"].add_argument(
        "--dvc-config", type=Path, help="with --follow: a DVC config file (remotes, credentials)"
    )
    parsers["serve"].add_argument(
        "--model-dir", type=Path, help="with --follow: install dir (default: registry.follow_dir)"
    )
    parsers["serve"].add_argument(
        "--interval", type=float, help="with --follow: seconds between registry polls"
    )
    parsers["serve"].add_argument("--host", help="bind address (default: serve.host)")
    parsers["serve"].add_argument("--port", type=int, help="port (default: serve.port)")
    parsers["predict"].add_argument("files", nargs="+", help="PNG/JPEG files")
    parsers["predict"].add_argument(
        "--model", type=Path, help="ONNX model (default: the production model)"
    )
    parsers["sweep-apply"].add_argument(
        "override", type=Path, help="override file, e.g. reports/sweep/best.yaml"
    )
    parsers["sweep-apply"].add_argument("-n", "--name", help="name of the DVC experiment")
    parsers["sweep-apply"].add_argument(
        "--dry-run", action="store_true", help="print the dvc command, do not run it"
    )
    return parser


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from err
    return out


def config_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Config:
    overrides = parse_overrides(args.overrides)
    if getattr(args, "follow", None) and not Path(args.params).exists():
        # A service machine following the registry has no checkout, hence no params.yaml.
        return config_from_dict({}, overrides)
    source = environ.get(SOURCE_ENV)
    if source:
        overrides["data.source"] = source
    if args.profile:
        from pipeline.core.profiles import compose_text, overrides_for

        text = compose_text(Path(args.params).resolve().parent, overrides_for(args.profile, {}))
        return config_from_dict(parse_params(text, f"conf/ with profile {args.profile}"), overrides)
    return load_config(args.params, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # GX logs its own start-up at INFO; keep the stage's output readable.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
    try:
        cfg = config_from_args(args, dict(os.environ))
        handler, _ = STAGES[args.stage]
        handler(cfg, args)
    except PipelineError as err:
        # One line, whatever the message: CI logs and `dvc repro` output stay readable.
        message = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {type(err).__name__}: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
