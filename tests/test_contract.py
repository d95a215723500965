"""docs/onnx-contract.md documents every key of the model directory that a runtime reads and that the exporter writes.

The keys the Python runtime reads are taken from its source (``medsam_rt/*.py``, parsed, not imported), those the
C++ example reads from its source, those the exporter writes from a real export (``tiny_dir``). Key paths are
dotted, ``*`` for a name that varies (a role, a precision); the document writes those as ``<role>``,
``<precision>``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import onnxruntime as ort

from medsam_rt.core import preprocess
from medsam_rt.core.manifest import METADATA_PREFIX, PRECISIONS, ROLES, SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "onnx-contract.md"
CPP_SOURCES = sorted((REPO / "examples" / "cpp" / "src").glob("*.cpp"))


def documented() -> set[str]:
    """Every `code span` of the document that looks like a key path, with ``<placeholder>`` segments as ``*``."""
    spans = re.findall(r"`([^`\n]+)`", DOC.read_text(encoding="utf-8"))
    paths = {re.sub(r"<[^>]+>", "*", s.strip()).replace("[]", "") for s in spans}  # list[].key: an element's key
    return {p for p in paths if re.fullmatch(r"[A-Za-z0-9_.*-]+", p)}


# ------------------------------------------------------------------------------ keys the Python runtime reads


Env = dict[tuple[str, str], set]  # ("path" | "const" | "dict", local name) -> key paths | strings | dict keys


class _KeyReads:
    """The manifest and metadata_props key paths one function reads, found by following its data flow.

    Roots: ``<expr>.raw`` (a parsed manifest), ``json.loads(...)`` in a function that names the manifest file,
    the ``data`` argument of ``Preprocessing.from_dict`` (the ``preprocessing`` entry), and a dict comprehension
    over graph metadata that strips ``METADATA_PREFIX``. A key is a string constant, a loop variable over
    constants (``for key in ("a", "b")``, ``for key, v in {"a": ...}.items()``, in that loop's body) or ``*``.
    """

    def __init__(
        self, fn: ast.FunctionDef, source: str, functions: dict[str, ast.FunctionDef], args: Env | None = None
    ) -> None:
        self.fn, self.source, self.functions = fn, source, functions
        text = ast.get_source_segment(source, fn) or ""
        self.names_manifest = "MANIFEST_NAME" in text or "manifest.json" in text
        self.args = args or {}  # a caller's bindings of this function's parameters
        self.found: set[tuple[str, ...]] = set()

    def reads(self, depth: int = 0) -> set[tuple[str, ...]]:
        self.depth = depth
        env: Env = dict(self.args)
        if self.fn.name == "from_dict" and len(self.fn.args.args) > 1:
            env[("path", self.fn.args.args[1].arg)] = {("preprocessing",)}
        for stmt in self.fn.body:
            self._visit(stmt, env)
        return {p for p in self.found if p}

    def _call(self, node: ast.Call, env: Env) -> None:
        """A call of a module-level function with manifest data as arguments: what the callee reads of them."""
        callee = self.functions.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if callee is None or self.depth >= 3:
            return
        params = [a.arg for a in callee.args.args]
        args = {
            ("path", params[i]): paths for i, a in enumerate(node.args[: len(params)]) if (paths := self._paths(a, env))
        }
        if args:
            self.found |= _KeyReads(callee, self.source, self.functions, args).reads(self.depth + 1)

    def _visit(self, node: ast.AST, env: Env) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return  # nested definitions are read on their own
        if isinstance(node, ast.For):
            self._visit(node.iter, env)
            inner = {**env, **self._loop(node.target, node.iter, env)}
            for stmt in node.body:
                self._visit(stmt, inner)
            for stmt in node.orelse:
                self._visit(stmt, env)
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                self._visit(gen.iter, inner)
                inner.update(self._loop(gen.target, gen.iter, inner))
                for cond in gen.ifs:
                    self._visit(cond, inner)
            for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
                self._visit(part, inner)
            return
        if isinstance(node, (ast.Subscript, ast.Call)):
            self.found |= self._paths(node, env)
        if isinstance(node, ast.Call):
            self._call(node, env)
        for child in ast.iter_child_nodes(node):
            self._visit(child, env)
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        target = node.target if isinstance(node, ast.AnnAssign) and node.value is not None else target
        if isinstance(target, ast.Name):  # after the value was visited: bind the name for what follows
            env[("path", target.id)] = self._paths(node.value, env)
            if isinstance(node.value, ast.Dict):
                env[("dict", target.id)] = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}

    def _loop(self, target: ast.AST, it: ast.AST, env: Env) -> Env:
        names = [t.id for t in (target.elts if isinstance(target, ast.Tuple) else [target]) if isinstance(t, ast.Name)]
        bound: Env = {}
        if not names:
            return bound
        if isinstance(it, (ast.Tuple, ast.List)):
            bound[("const", names[0])] = {e.value for e in it.elts if isinstance(e, ast.Constant)}
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr == "items":
            if isinstance(it.func.value, ast.Name) and ("dict", it.func.value.id) in env:
                bound[("const", names[0])] = env[("dict", it.func.value.id)]
            if len(names) == 2 and (base := self._paths(it.func.value, env)):
                bound[("path", names[1])] = {p + ("*",) for p in base}
        elif len(names) == 1 and (base := self._paths(it, env)):
            bound[("path", names[0])] = base  # the elements of an array
        return bound

    def _keys(self, node: ast.AST, env: Env) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.Name) and ("const", node.id) in env:
            return env[("const", node.id)]
        return {"*"}

    def _paths(self, node: ast.AST, env: Env) -> set[tuple[str, ...]]:
        if isinstance(node, ast.Attribute) and node.attr == "raw":
            return {()}
        if isinstance(node, ast.Name):
            return env.get(("path", node.id), set())
        if isinstance(node, ast.Subscript):
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, int):
                return self._paths(node.value, env)  # an array element, not a key
            return {p + (k,) for p in self._paths(node.value, env) for k in self._keys(node.slice, env)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and node.args:
                return {p + (k,) for p in self._paths(node.func.value, env) for k in self._keys(node.args[0], env)}
            if node.func.attr == "loads" and self.names_manifest:
                return {()}
        if isinstance(node, ast.BoolOp):  # `a.get(x) or b`
            return set().union(*(self._paths(v, env) for v in node.values))
        if isinstance(node, ast.DictComp) and "METADATA_PREFIX" in ast.unparse(node):
            return {("<metadata>",)}  # a graph's metadata_props, keys without the prefix
        return set()


def python_runtime_reads() -> tuple[set[str], set[str]]:
    """(manifest key paths, metadata_props keys) that the runtime's modules read (``medsam_rt/`` without the server
    and the batch/Triton tools, whose JSON is their own); only the deepest paths are kept.

    Role and precision names in a path are variable segments (``graphs.encoder.fp32.file`` is ``graphs.*.*.file``).
    """
    found: set[tuple[str, ...]] = set()
    runtime = REPO / "medsam_rt"
    for path in sorted(p for p in runtime.rglob("*.py") if p.parent.name not in ("serve", "scale")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                found |= _KeyReads(fn, source, functions).reads()
    found = {tuple("*" if k in (*ROLES, *PRECISIONS) else k for k in p) for p in found}
    deepest = {p for p in found if not any(q[: len(p)] == p and q != p for q in found)}
    metadata = {METADATA_PREFIX + p[1] for p in deepest if p[0] == "<metadata>" and len(p) == 2}
    manifest = {".".join(p) for p in deepest if p[0] != "<metadata>"}
    return manifest, metadata


def test_finds_what_the_runtime_is_known_to_read():
    """Guards the parser: a broken one would find nothing and pass the documentation test vacuously."""
    manifest, _ = python_runtime_reads()
    known = {
        "format",
        "schema_version",
        "model.source",
        "model.checksum",
        "graphs.*.*.file",
        "graphs.*.*.sha256",
        "graphs.*.*.bytes",
        "parity.*.passed",
        "preprocessing.resize",
        "preprocessing.mask_threshold",
    }
    assert known <= manifest, known - manifest


def test_python_runtime_reads_are_documented():
    manifest, metadata = python_runtime_reads()
    missing = sorted((manifest | metadata) - documented())
    assert not missing, f"docs/onnx-contract.md does not document these keys the runtime reads: {missing}"


def test_preprocessing_vocabulary_is_documented():
    """Every recipe entry (Preprocessing's fields) and every value each one may take."""
    doc = documented()
    fields = {f"preprocessing.{f.name}" for f in dataclasses.fields(preprocess.Preprocessing)}
    values = {
        *preprocess.RESIZE_MODES,
        *preprocess.INTERPOLATIONS,
        *preprocess.NORMALIZE_MODES,
        *preprocess.BOX_SCALES,
        *preprocess.BOX_ROUNDINGS,
        *preprocess.POSTPROCESS_MODES,
    }
    assert not fields - doc and not values - doc, sorted((fields | values) - doc)


# --------------------------------------------------------------------------------- keys the C++ example reads


def cpp_reads() -> tuple[set[str], set[str]]:
    """(manifest key names, metadata_props keys) in the C++ example's lookups: ``at(obj, "key", ...)``,
    ``member(obj, "key")``, ``find(obj, "key")``, ``obj.find("key")`` and ``"medsam_rt.*"`` constants."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in CPP_SOURCES)
    names = set(re.findall(r"\b(?:at|member|find)\(\s*\*?[\w.]+\s*,\s*\"([A-Za-z0-9_]+)\"", text))
    names |= set(re.findall(r"(?:\.|->)find\(\s*\"([A-Za-z0-9_]+)\"\s*\)", text))
    metadata = set(re.findall(r"\"(" + re.escape(METADATA_PREFIX) + r"[A-Za-z0-9_]+)\"", text))
    return names, metadata


def test_cpp_example_reads_are_documented():
    names, metadata = cpp_reads()
    assert {"format", "schema_version", "sha256", "passed", "resize", "box_round"} <= names  # the scan works
    assert {METADATA_PREFIX + "role", METADATA_PREFIX + "preprocessing"} <= metadata
    doc = documented()
    leaves = {p.rsplit(".", 1)[-1] for p in doc}
    assert not names - leaves, f"manifest keys the C++ example reads, undocumented: {sorted(names - leaves)}"
    assert not metadata - doc, f"metadata keys the C++ example reads, undocumented: {sorted(metadata - doc)}"


# --------------------------------------------------------------------------------- keys the exporter writes


def test_exported_keys_are_documented(tiny_dir):
    """The schema'd parts of a real manifest (top level, model, preprocessing, graphs, parity) and every
    metadata_props key of every graph."""
    m = json.loads((tiny_dir / "manifest.json").read_text())
    written = {*m, *(f"model.{k}" for k in m["model"]), *(f"preprocessing.{k}" for k in m["preprocessing"])}
    written |= {f"graphs.*.*.{k}" for role in m["graphs"].values() for entry in role.values() for k in entry}
    written |= {f"parity.*.{k}" for entry in m["parity"].values() for k in entry}
    for role in m["graphs"].values():
        for entry in role.values():
            session = ort.InferenceSession(str(tiny_dir / entry["file"]), providers=["CPUExecutionProvider"])
            written |= set(session.get_modelmeta().custom_metadata_map)
    missing = sorted(written - documented())
    assert not missing, f"docs/onnx-contract.md does not document these keys the exporter writes: {missing}"


def test_documented_schema_version_and_metadata_prefix():
    text = DOC.read_text(encoding="utf-8")
    stated = re.search(r"`schema_version` (\d+)", text)
    assert stated and int(stated.group(1)) == SCHEMA_VERSION, "the document must state the schema version it describes"
    assert f"`{METADATA_PREFIX}`" in text, "the document must state the metadata_props key prefix"
