"""What each ``python -m pipeline <stage>`` really uses: project modules and parameters.

Static analysis (``ast``) of the source tree, no import of stage code; used by
``tests/test_stage_deps.py`` to hold ``dvc.yaml`` to it, and runnable as
``python scripts/stage_deps.py`` to print what each stage's ``deps``/``params`` must list
(``--write`` rewrites the module deps of ``dvc.yaml`` in place).

Modules: the import closure of the stage's entry point, ``pipeline/__main__.py`` ->
``pipeline/cli.py`` (its module-level imports and the imports inside the stage's own
handler, found through ``cli.STAGES``; the other stages' handlers are not followed) ->
every ``pipeline.*`` module imported anywhere in a reached module, at module level or
lazily inside a function (a lazy import runs on some path, so it is a dependency),
with the packages' ``__init__.py`` files that Python runs on the way.

Parameters: every read of a :class:`pipeline.core.config.Config` field in the reached code.
A variable holds a config object when it is a parameter annotated with a config
dataclass (``cfg: Config``, ``tc: TrainConfig``) or is assigned from a field chain of
one (``tc = cfg.train``). Each attribute chain on it names a key (``cfg.train.lr`` ->
``train.lr``; ``tc.augment.enabled`` -> ``train.augment.enabled``). Whatever the
analysis cannot follow counts as reading the whole object, so the result over-approximates
and never misses a read: a config object (or section) used bare -- passed to a function
whose parameter is not annotated as a config class, stored, returned, given to
``dataclasses.replace``/``asdict`` -- or an attribute that is not a field (a method such
as ``params_hash()``) reads every key under it. Passing it to a project function whose
parameter *is* annotated as a config class is not a read: that function's own body is
analysed. The one exception is :data:`PROVENANCE_METHODS`, see there.

Only functions reachable from the stage's handler count (by name: see
:func:`params_read`); a module is a dependency as a whole (any edit of the file can
change what the stage does), but a parameter read in a function the stage cannot reach
changes nothing it computes.

Why static and not a recording proxy while running the stage: a run only sees the
branches it takes (``export.quantize: false`` never reads ``gate.max_regression``); the
static reading covers every branch of every reachable function. Known blind spots, none
used in this code base: attribute access through ``getattr(cfg, "name")`` with a computed
name, config objects smuggled through untyped containers and read back (the store
itself counts as reading everything, so only a read-back through another object is
missed), and functions reached only through ``getattr``/strings.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parents[1]

# Config methods that read every parameter only to *label* an output with a hash of the
# whole configuration (provenance), not to compute it: declaring every parameter of the
# project (serve.port, flow.*) for that reason would re-run training when the server's
# port changes. The label stays correct for the run that wrote it.
PROVENANCE_METHODS = frozenset({"params_hash"})

# Modules whose config reads are not stage inputs: the loader/schema itself (it reads
# every key to validate it; an invalid value fails every stage alike).
NOT_ANALYSED_FOR_PARAMS = frozenset({"pipeline.core.config"})


@dataclass(frozen=True)
class StageUse:
    modules: frozenset[str]  # dotted module names
    files: frozenset[str]  # their files, relative to the root, posix
    keys: frozenset[str]  # dotted parameter keys ("" = the whole configuration)


# --------------------------------------------------------------------------- modules


def module_path(root: Path, module: str) -> Path | None:
    """``pipeline/x.py`` or ``pipeline/x/__init__.py`` for ``pipeline.x``; None if neither."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The absolute module an ``ImportFrom`` refers to (resolving relative imports)."""
    if node.level == 0:
        return node.module
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(root: Path, module: str, nodes: Iterable[ast.AST]) -> set[str]:
    """Project modules imported by the import statements among ``nodes``."""
    path = module_path(root, module)
    is_package = path is not None and path.name == "__init__.py"
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node, is_package)
            if target is None:
                continue
            found.add(target)
            # `from pipeline import x` / `from pipeline.serving import y`: submodules.
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if _in_project(m) and module_path(root, m) is not None}


def _in_project(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _with_packages(modules: Iterable[str]) -> set[str]:
    """Add the packages Python imports first (``pipeline``, ``pipeline.serving``)."""
    out: set[str] = set()
    for m in modules:
        parts = m.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def stage_handlers(root: Path) -> dict[str, str]:
    """``cli.STAGES`` as stage name -> handler function name, read from the source."""
    tree = _parse(root / PACKAGE / "cli.py")
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if not (isinstance(target, ast.Name) and target.id == "STAGES"):
            continue
        value = node.value
        if not isinstance(value, ast.Dict):
            break
        out = {}
        for key, item in zip(value.keys, value.values, strict=True):
            if (
                isinstance(key, ast.Constant)
                and isinstance(item, ast.Tuple)
                and isinstance(item.elts[0], ast.Name)
            ):
                out[str(key.value)] = item.elts[0].id
        return out
    raise AssertionError("pipeline/cli.py: no `STAGES = {name: (handler, help), ...}` found")


def _functions(tree: ast.AST) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {
        n.name: n
        for n in getattr(tree, "body", [])
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def cli_imports(root: Path, stage: str) -> tuple[set[str], ast.FunctionDef | ast.AsyncFunctionDef]:
    """What ``cli.py`` imports for ``stage``, and the stage's handler function.

    Everything in cli.py counts except the bodies of the *other* stages' handlers.
    """
    handlers = stage_handlers(root)
    if stage not in handlers:
        raise KeyError(f"stage {stage!r} is not in pipeline/cli.py STAGES ({sorted(handlers)})")
    tree = _parse(root / PACKAGE / "cli.py")
    funcs = _functions(tree)
    others = {funcs[h] for s, h in handlers.items() if s != stage and h != handlers[stage]}
    skipped = {id(n) for f in others for n in ast.walk(f)}
    nodes = [n for n in ast.walk(tree) if id(n) not in skipped]
    return imported_modules(root, f"{PACKAGE}.cli", nodes), funcs[handlers[stage]]


def module_closure(root: Path, stage: str) -> set[str]:
    """Dotted names of every project module ``python -m pipeline <stage>`` may import."""
    main = f"{PACKAGE}.__main__"
    main_path = module_path(root, main)
    assert main_path is not None, f"{PACKAGE}/__main__.py missing"
    start = imported_modules(root, main, ast.walk(_parse(main_path)))
    from_cli, _ = cli_imports(root, stage)
    seen = {main, f"{PACKAGE}.cli"}
    todo = (start | from_cli) - seen
    while todo:
        module = todo.pop()
        seen.add(module)
        path = module_path(root, module)
        assert path is not None
        todo |= imported_modules(root, module, ast.walk(_parse(path))) - seen
    return _with_packages(seen)


def as_file(root: Path, module: str) -> str:
    path = module_path(root, module)
    assert path is not None
    return path.relative_to(root).as_posix()


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class Schema:
    """Config dataclasses by name -> their key prefix and fields (from pipeline.core.config)."""

    prefix: dict[str, str]  # "TrainConfig" -> "train", "Config" -> ""
    fields: dict[str, dict[str, str | None]]  # class -> field -> config class of it or None

    @classmethod
    def load(cls) -> Schema:
        from pipeline.core.config import Config

        prefix: dict[str, str] = {}
        table: dict[str, dict[str, str | None]] = {}

        def visit(klass: type[Any], where: str) -> None:
            prefix.setdefault(klass.__name__, where)
            hints = get_type_hints(klass)
            table[klass.__name__] = {}
            for f in fields(klass):
                hint = hints[f.name]
                sub = hint if isinstance(hint, type) and is_dataclass(hint) else None
                table[klass.__name__][f.name] = sub.__name__ if sub else None
                if sub is not None:
                    visit(sub, f"{where}.{f.name}" if where else f.name)

        visit(Config, "")
        return cls(prefix, table)


def _annotation_class(node: ast.expr | None, schema: Schema) -> str | None:
    """The config class an annotation names (``Config``, ``TrainConfig | None``, ...)."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _annotation_class(ast.parse(node.value, mode="eval").body, schema)
    if isinstance(node, ast.Name) and node.id in schema.prefix:
        return node.id
    if isinstance(node, ast.Attribute) and node.attr in schema.prefix:
        return node.attr
    if isinstance(node, ast.BinOp):  # X | None
        return _annotation_class(node.left, schema) or _annotation_class(node.right, schema)
    return None


def _params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = func.args
    return [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs]


@dataclass
class _Analysis:
    schema: Schema
    # every function and method of the stage's modules, by name (callee resolution)
    functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]]
    keys: set[str]

    def config_param(self, call: ast.Call, arg: ast.expr) -> bool:
        """True if ``arg`` goes to a config-annotated parameter of every possible callee."""
        func = call.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        candidates = self.functions.get(name or "", [])
        if not candidates:
            return False
        for callee in candidates:
            params = _params(callee)
            if arg in call.args:
                index = call.args.index(arg)
                positional = [*callee.args.posonlyargs, *callee.args.args]
                param = positional[index] if index < len(positional) else None
            else:
                kw = next(k for k in call.keywords if k.value is arg).arg
                param = next((p for p in params if p.arg == kw), None)
            if param is None or _annotation_class(param.annotation, self.schema) is None:
                return False
        return True

    def resolve(self, klass: str, where: str, attrs: list[str]) -> tuple[str, str | None, int]:
        """Follow field ``attrs`` from ``klass`` at ``where``.

        Returns ``(key, class or None, consumed)``: the class is None when the chain
        reached a plain field (key complete) or a non-field attribute (whole ``where``).
        """
        for i, attr in enumerate(attrs):
            table = self.schema.fields[klass]
            dotted = f"{where}.{attr}" if where else attr
            if attr not in table:
                if attr in PROVENANCE_METHODS:
                    return "", None, -1  # a provenance label: no read
                return where, None, i  # a method/property: reads the whole object
            sub = table[attr]
            if sub is None:
                return dotted, None, i + 1
            klass, where = sub, dotted
        return where, klass, len(attrs)

    def function(self, func: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        env: dict[str, tuple[str, str]] = {}  # variable -> (class, key prefix)
        for p in _params(func):
            klass = _annotation_class(p.annotation, self.schema)
            if klass is not None:
                env[p.arg] = (klass, self.schema.prefix[klass])
        for node in ast.walk(func):
            for child in ast.iter_child_nodes(node):
                child._parent = node  # type: ignore[attr-defined]
        aliases = [
            n
            for n in ast.walk(func)
            if isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
        ]
        changed = True
        while changed:  # tc = cfg.train; aug = tc.augment; ...
            changed = False
            for assign in aliases:
                target = assign.targets[0]
                assert isinstance(target, ast.Name)
                chain = _chain(assign.value)
                if chain is None or chain[0] not in env or target.id in env:
                    continue
                klass, where = env[chain[0]]
                _, sub, _ = self.resolve(klass, where, chain[1])
                if sub is not None:
                    key, _, _ = self.resolve(klass, where, chain[1])
                    env[target.id] = (sub, key)
                    changed = True
        if not env:
            return
        for node in ast.walk(func):
            if isinstance(node, ast.Name) and node.id in env and isinstance(node.ctx, ast.Load):
                self.use(node, *env[node.id], env)

    def use(self, name: ast.Name, klass: str, where: str, env: dict[str, tuple[str, str]]) -> None:
        top: ast.expr = name
        attrs: list[str] = []
        parent = getattr(top, "_parent", None)
        while isinstance(parent, ast.Attribute) and parent.value is top:
            attrs.append(parent.attr)
            top = parent
            parent = getattr(top, "_parent", None)
        key, sub, consumed = self.resolve(klass, where, attrs)
        if consumed == -1:
            return
        if sub is None:
            self.keys.add(key)
            return
        # The chain ends at a config object used as a whole: is that use analysed elsewhere?
        if isinstance(parent, ast.Assign) and len(parent.targets) == 1:
            target = parent.targets[0]
            if isinstance(target, ast.Name) and env.get(target.id) == (sub, key):
                return  # an alias: its own uses are the reads
        if isinstance(parent, ast.keyword):
            call = getattr(parent, "_parent", None)
            if isinstance(call, ast.Call) and self.config_param(call, top):
                return
        if isinstance(parent, ast.Call) and top in parent.args and self.config_param(parent, top):
            return
        self.keys.add(key)


def _chain(node: ast.expr) -> tuple[str, list[str]] | None:
    """``a.b.c`` as ``("a", ["b", "c"])``; None for anything else."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def _defs(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node


def _names_used(node: ast.AST) -> set[str]:
    """Every identifier a body mentions: called, passed as a callback, or instantiated."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
    return out


def params_read(root: Path, stage: str, modules: set[str], schema: Schema) -> set[str]:
    """Dotted keys the stage may read ("" = every key).

    Only functions reachable from the stage's handler are read: a name mentioned in a
    reached body (call, callback, class instantiation, ``module.attr``) reaches every
    function, method or class of that name in the stage's modules (by name, so several
    candidates may be reached: an over-approximation).
    """
    index: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]] = {}
    for m in sorted(modules):
        path = module_path(root, m)
        if path is None or m in NOT_ANALYSED_FOR_PARAMS or m == f"{PACKAGE}.cli":
            continue
        for node in _defs(_parse(path)):
            index.setdefault(node.name, []).append(node)
    functions = {
        name: [f for f in nodes if not isinstance(f, ast.ClassDef)] for name, nodes in index.items()
    }
    analysis = _Analysis(schema, functions, set())
    _, handler = cli_imports(root, stage)
    todo: list[ast.AST] = [handler]
    reached: set[int] = set()
    while todo:
        node = todo.pop()
        if id(node) in reached:
            continue
        reached.add(id(node))
        for name in _names_used(node):
            todo += index.get(name, [])
    for nodes in index.values():
        for node in nodes:
            if id(node) in reached:
                for func in _defs(node):  # the def itself and the ones nested in it
                    if not isinstance(func, ast.ClassDef):
                        analysis.function(func)
    analysis.function(handler)
    return analysis.keys


def stage_use(root: Path, stage: str, schema: Schema | None = None) -> StageUse:
    modules = module_closure(root, stage)
    files = frozenset(as_file(root, m) for m in modules)
    keys = params_read(root, stage, modules, schema or Schema.load())
    return StageUse(frozenset(modules), files, frozenset(keys))


def write_module_deps(dvc_yaml: Path, root: Path) -> str:
    """``dvc.yaml`` text with each stage's ``pipeline/`` deps replaced by its closure.

    Text-level, so comments and layout stay: within each stage, the run of
    ``- pipeline/...`` lines under ``deps:`` is replaced (appended at the end of the
    ``deps`` list if there is none). Parameters are left to a person: which section or
    key to declare is a choice.
    """
    lines = dvc_yaml.read_text().splitlines(keepends=True)
    out: list[str] = []
    stage: str | None = None
    in_deps = False
    written = False
    indent = ""

    def emit() -> None:
        nonlocal written
        if stage is not None and not written:
            files = sorted(stage_use(root, stage).files)
            out.extend(f"{indent}- {f}\n" for f in files)
            written = True

    for line in lines:
        stripped = line.strip()
        depth = len(line) - len(line.lstrip())
        if depth == 2 and stripped.endswith(":") and not stripped.startswith("#"):
            stage, in_deps, written = stripped[:-1], False, False
            out.append(line)
            continue
        if depth == 0 and stripped:
            stage = None
        if stage is not None and depth == 4 and stripped:
            if in_deps:
                emit()
            in_deps = stripped == "deps:"
            out.append(line)
            continue
        if in_deps and stripped.startswith(f"- {PACKAGE}/"):
            indent = line[: len(line) - len(line.lstrip())]
            emit()
            continue
        if in_deps and stripped.startswith("- "):
            indent = line[: len(line) - len(line.lstrip())]
        out.append(line)
    return "".join(out)


if __name__ == "__main__":
    import yaml

    if sys.argv[1:] == ["--write"]:
        path = ROOT / "dvc.yaml"
        path.write_text(write_module_deps(path, ROOT))
        print(f"{path}: module deps rewritten; check params with pytest tests/test_stage_deps.py")
        sys.exit(0)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        if not str(stages[name].get("cmd", "")).startswith(f"python -m {PACKAGE} "):
            continue
        use = stage_use(ROOT, name)
        print(f"{name}:\n  deps (modules):")
        print("".join(f"    - {f}\n" for f in sorted(use.files)), end="")
        print("  params read:", ", ".join(sorted(k or "<everything>" for k in use.keys)))
    sys.exit(0)
