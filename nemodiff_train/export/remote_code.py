"""Generate ``modeling_nemodiff.py``: self-contained remote code with the four decoders.

The file is built at export time from a small template (the model class and a KV-cache adapter) and
the *source* of ``nemodiff_train/decoding/`` itself, inlined module by module: the modules reachable
from ``decoding/__init__.py`` through relative imports are concatenated in dependency order, their
relative imports, ``__future__`` imports, module docstrings and ``__all__`` lists removed and their
absolute imports (torch and the standard library only, which tests/unit/test_import_boundaries.py enforces) hoisted. So the
remote decoders are our decoders, byte for byte, and cannot drift from them.

The decoders' model adapters are inlined the same way from ``nemodiff_train/models/static_cache.py``
(the static-shape cache, used on CUDA), ``nemodiff_train/models/cached.py`` (the dynamic one) and the
two modules they import (``attention.py``: the mask in the form each attention implementation reads,
eager included; ``arch.py``: per-layer sliding windows), which may also import transformers. So a
remote-code model loaded with ``attn_implementation="eager"`` or with sliding windows decodes exactly
like the package.

The model class subclasses the base architecture's transformers class (``Qwen3ForCausalLM``,
``LlamaForCausalLM``, ... chosen by ``model_type``) and only adds a ``mode=`` switch to
``generate``; the weights, config and forward are the base architecture's.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

from .errors import ExportError

__all__ = ["MODELING_FILE", "remote_class_name", "base_class_name", "inline_decoding", "inline_package",
           "modeling_source", "write_remote_code"]

MODELING_FILE = "modeling_nemodiff.py"
DECODING_DIR = Path(__file__).resolve().parents[1] / "decoding"
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
_ALLOWED_ROOTS = frozenset(sys.stdlib_module_names) | {"torch"}
_ADAPTER_ROOTS = _ALLOWED_ROOTS | {"transformers"}  # the model adapter may use transformers (remote code has it)


def base_class_name(model_type: str) -> str:
    """The transformers ``*ForCausalLM`` class name of a ``model_type`` (e.g. ``qwen3`` → ``Qwen3ForCausalLM``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ExportError(f"remote_code: model_type {model_type!r} has no causal-LM class in transformers, so no "
                          "remote code can subclass it")
    return name


def remote_class_name(model_type: str) -> str:
    return "NemoDiff" + base_class_name(model_type)


# ----------------------------------------------------------------------------------------------
# inlining the decoding package


def _module_source(package: Path, name: str) -> str:
    file = package / f"{name}.py"
    if not file.is_file():
        raise ExportError(f"remote_code: decoding module {file} not found")
    return file.read_text()


def _dependency_order(package: Path, entry: str = "__init__", allowed: frozenset = _ALLOWED_ROOTS) -> list[str]:
    """Modules reachable from ``entry`` by relative imports, dependencies first."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ExportError(f"remote_code: import cycle through {package / name}.py")
        visiting.add(name)
        tree = ast.parse(_module_source(package, name))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                where = f"{package / name}.py line {node.lineno}"
                if node.level > 1 or node.module is None:
                    raise ExportError(f"remote_code: {where}: only 'from .module import name' can be inlined")
                if id(node) not in top:
                    raise ExportError(f"remote_code: {where}: relative import inside a function cannot be inlined")
                visit(node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) \
                    else [(node.module or "").split(".")[0]]
                bad = [r for r in roots if r not in allowed]
                if bad:
                    raise ExportError(f"remote_code: {package / name}.py line {node.lineno} imports {bad[0]!r}; "
                                      f"{package.name} modules may import only {_allowed_text(allowed)}")
        visiting.discard(name)
        order.append(name)

    visit(entry)
    return order


def _allowed_text(allowed: frozenset) -> str:
    extra = sorted(allowed - frozenset(sys.stdlib_module_names))
    return " and ".join(extra) + " and the standard library" if extra else "the standard library"


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def inline_decoding(package: Path = DECODING_DIR) -> tuple[list[str], str, list[str]]:
    """The decoding package as one flat module (see :func:`inline_package`; torch and stdlib only)."""
    imports, body, modules = inline_package(package, label="decoding")
    return _merge_imports(imports), body, modules


def inline_package(package: Path, entry: str = "__init__", allowed: frozenset = _ALLOWED_ROOTS,
                   label: str | None = None):
    """The modules of ``package`` reachable from ``entry`` as one flat module.

    Returns:
        ``(imports, body, modules)``: the hoisted absolute import nodes, the concatenated code and the
        inlined module names in order.
    Raises:
        ExportError: a module imports something outside ``allowed``, or two modules define the
            same top-level name (they would overwrite each other in one namespace).
    """
    label = label or package.name  # the folder name messages and section comments show
    modules = _dependency_order(package, entry, allowed)
    imports: list[ast.Import | ast.ImportFrom] = []
    parts: list[str] = []
    owner: dict[str, str] = {}
    for name in modules:
        src = _module_source(package, name)
        tree = ast.parse(src)
        lines = src.splitlines()
        drop: set[int] = set()  # 0-based line numbers
        replace: dict[int, list[str]] = {}
        for i, node in enumerate(tree.body):
            span = range(node.lineno - 1, node.end_lineno)
            if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                drop.update(span)  # module docstring
            elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
                drop.update(span)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                drop.update(span)
                aliases = [f"{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
                if aliases:
                    replace[node.lineno - 1] = aliases
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                drop.update(span)
                imports.append(node)
            elif any(n == "__all__" for n in _defined_names(node)):
                drop.update(span)
            else:
                for defined in _defined_names(node):
                    if defined in owner and owner[defined] != name:
                        raise ExportError(f"remote_code: {defined!r} is defined in both {label}/{owner[defined]}.py "
                                          f"and {label}/{name}.py; they cannot share the inlined namespace")
                    owner[defined] = name
        kept = []
        for n, line in enumerate(lines):
            if n in replace:
                kept.extend(replace[n])
            if n not in drop:
                kept.append(line)
        body = "\n".join(kept).strip("\n")
        parts.append(f"# {'-' * 96}\n# inlined from nemodiff_train/{label}/{name}.py\n# {'-' * 96}\n\n{body}\n")
    return imports, "\n\n".join(parts), modules


def _merge_imports(nodes: list[ast.Import | ast.ImportFrom]) -> list[str]:
    """One ``import`` line per module, names merged in first-seen order (``from typing import Any, Literal``)."""
    plain: list[str] = []
    from_names: dict[str, list[str]] = {}
    for node in nodes:
        names = [a.name if not a.asname else f"{a.name} as {a.asname}" for a in node.names]
        if isinstance(node, ast.Import):
            plain.extend(n for n in names if n not in plain)
        else:
            bucket = from_names.setdefault(node.module, [])
            bucket.extend(n for n in names if n not in bucket)
    return [f"import {n}" for n in plain] + [f"from {m} import {', '.join(ns)}" for m, ns in from_names.items()]


# ----------------------------------------------------------------------------------------------
# the template

_HEADER = '''\
# Generated by nemodiff-train {version} (nemodiff_train/export/remote_code.py). Do not edit: re-export instead.
# Decoders inlined from the nemodiff_train.decoding package, modules
{modules}
"""Self-contained remote code of a nemodiff diffusion LM ({base}, DLM settings in config.json "nemodiff").

Load:  AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

The weights, config and forward are the plain {base}; this file only extends ``generate``:

* ``generate(input_ids, ...)`` without ``mode`` is transformers' standard ``generate`` (AR);
* ``generate(input_ids, mode=M, max_new_tokens=..., block_size=..., threshold=..., steps_per_block=...,
  temperature=..., top_p=..., eos_token_id=..., seed=..., attention_mask=...)`` with M one of
  ``"ar"``, ``"diffusion"``, ``"linear_spec"``, ``"quadratic_spec"`` runs nemodiff's decoders (the code
  below is inlined from nemodiff_train/decoding). It returns the prompt followed by the
  generated tokens, right-padded with ``pad_token_id``, as a ``[batch, length]`` LongTensor; with
  ``return_dict_in_generate=True`` a ``NemoDiffGenerateOutput`` with ``sequences``, per-row ``tokens`` and
  ``stats`` (forward counts, tokens per forward).

Defaults: ``block_size`` = config.nemodiff["inference_block_size"], ``eos_token_id`` = the generation
config's, ``max_new_tokens`` = the generation config's ``max_new_tokens`` or 128, greedy (temperature 0).
On CUDA the decoders run over a preallocated static KV cache with CUDA-graph replay (inlined from
nemodiff_train/models/static_cache.py); ``static_cache=False`` selects the dynamic cache and
``cuda_graphs=False`` plain eager forwards.

A drafter-adapter export (``adapter_config.json`` beside this file) loads its untouched base (the path
relative to this export or the Hub id at the revision it records, or ``from_pretrained(...,
base_model=...)``; never with ``trust_remote_code``) plus the adapter (inlined from
nemodiff_train/models/adapter.py); the decoders switch it on for draft / denoise tokens only.
"""

from __future__ import annotations

'''

_FOOTER = '''

# {rule}
# model class
# {rule}

from transformers import {base} as _NemoDiffBase

_nemodiff_decode = generate  # the decoding package's dispatcher (inlined above)


class NemoDiffGenerateOutput(dict):
    """``generate(..., mode=..., return_dict_in_generate=True)``: ``sequences`` ``[b, P + N]``, ``tokens``
    (generated ids per row), ``stats`` (per row: forwards, tokens per forward, ...)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_NEMODIFF_GENERATE_KEYS = frozenset({{
    "input_ids", "attention_mask", "max_new_tokens", "block_size", "threshold", "steps_per_block", "temperature",
    "top_p", "eos_token_id", "seed", "pad_token_id", "return_dict_in_generate", "do_sample", "generation_config",
    "static_cache", "cuda_graphs",
}})


class {cls}(_NemoDiffBase):
    """{base} with nemodiff's decoding modes in ``generate(mode=...)`` (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A drafter-adapter export (config.json ``nemodiff.adapter``): load the untouched base it names
        (``base_model=<path or Hub id>``, else the recorded path relative to this export, else the
        recorded Hub id at its recorded revision) and attach the adapter, switched per token by
        ``generate(mode=...)`` (plain ``generate`` is the base). ``revision`` selects this repo's
        revision (config and adapter weights); the base is pinned by the record and loads as plain
        transformers (``trust_remote_code`` is not passed on to it). Anything else loads as the base
        class does."""
        from transformers import AutoConfig
        from transformers.modeling_utils import load_state_dict
        from transformers.utils import cached_file

        base_model = kwargs.pop("base_model", None)
        revision = kwargs.get("revision")
        hub = {{k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "proxies", "force_download")
               if k in kwargs}}  # where this repo's own files come from
        config = kwargs.get("config")
        if config is None or isinstance(config, str):
            config = AutoConfig.from_pretrained(config or pretrained_model_name_or_path, revision=revision, **hub)
        record = (getattr(config, "nemodiff", None) or {{}}).get("adapter")
        if not record:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        kwargs["config"] = config
        kwargs.pop("revision", None)
        kwargs.pop("trust_remote_code", None)  # the base runs no code of its own
        kwargs.pop("adapter_kwargs", None)  # transformers' PEFT loading: the adapter is attached below, per token
        here = str(pretrained_model_name_or_path)
        recorded = []
        if record.get("base_path"):
            path = record["base_path"]  # relative to this export (older exports: absolute)
            recorded.append((path if path.startswith("/") else here.rstrip("/") + "/" + path, None))
        if record.get("base_hub_id"):
            recorded.append((record["base_hub_id"], record.get("base_revision")))
        bases = [(base_model, None)] if base_model else recorded
        model, errors = None, []
        for base, base_revision in bases:
            try:
                model = super().from_pretrained(base, *args, revision=base_revision, **kwargs)
                break
            except (OSError, ValueError) as e:
                errors.append(f"{{base}}: {{type(e).__name__}}: {{e}}")
        if model is None:
            raise OSError(f"{{pretrained_model_name_or_path}} is a nemodiff drafter adapter; its base model could not "
                          f"be loaded ({{'; '.join(errors) or 'none recorded'}}); pass base_model=<path or Hub id>")
        weights = load_state_dict(cached_file(here, "adapter_model.safetensors", revision=revision, **hub))
        adapter = attach_adapter(model, config.nemodiff["mask_token_id"], rank=int(record["r"]),
                                 alpha=float(record["lora_alpha"]), dropout=0.0,
                                 target_modules=tuple(record["target_modules"]))
        load_peft_state_dict(adapter, weights)
        adapter.to(device=model.device, dtype=model.dtype)
        return model.eval()

    def generate(self, inputs=None, *args, mode=None, **kwargs):
        if mode is None:
            return super().generate(inputs, *args, **kwargs)
        if args:
            raise TypeError("generate(mode=...) takes the input ids as its only positional argument")
        return self.nemodiff_generate(inputs, mode=mode, **kwargs)

    def nemodiff_generate(self, inputs=None, mode="diffusion", **kwargs):
        """Decode with one of nemodiff's modes; see the module docstring for the arguments."""
        unknown = sorted(set(kwargs) - _NEMODIFF_GENERATE_KEYS)
        if unknown:
            raise TypeError(f"generate(mode={{mode!r}}) got unsupported arguments {{unknown}}; "
                            f"supported: {{sorted(_NEMODIFF_GENERATE_KEYS)}}")
        if mode not in MODES:
            raise ValueError(f"unknown decoding mode {{mode!r}}; choose one of {{sorted(MODES)}}")
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("generate(mode=...) needs input_ids")
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            prompts = [row.tolist() for row in input_ids]
        else:
            attention_mask = torch.as_tensor(attention_mask).bool()
            prompts = [row[keep].tolist() for row, keep in zip(input_ids, attention_mask)]
        gen_cfg = kwargs.get("generation_config") or self.generation_config
        settings = getattr(self.config, "nemodiff", None) or {{}}
        if "mask_token_id" not in settings:
            raise ValueError("config.json has no nemodiff.mask_token_id: this is not a nemodiff DLM export")
        eos = kwargs.get("eos_token_id", getattr(gen_cfg, "eos_token_id", None))
        eos = () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos))
        temperature = kwargs.get("temperature")
        if temperature is None:
            temperature = float(getattr(gen_cfg, "temperature", None) or 1.0) if kwargs.get("do_sample") else 0.0
        cfg = {{"block_size": int(kwargs.get("block_size") or settings.get("inference_block_size", 32)),
               "threshold": kwargs.get("threshold", 0.9), "steps_per_block": kwargs.get("steps_per_block"),
               "temperature": float(temperature), "top_p": float(kwargs.get("top_p") or 1.0),
               "eos_token_ids": eos, "seed": int(kwargs.get("seed") or 0)}}
        max_new = kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None)
        if max_new:
            cfg["max_new_tokens"] = int(max_new)
        lm = self._nemodiff_lm(settings["mask_token_id"], prompts, mode, DecodeConfig(**cfg), kwargs)
        results = _nemodiff_decode(lm, prompts, mode, DecodeConfig(**cfg))
        pad = kwargs.get("pad_token_id")
        if pad is None:
            pad = getattr(gen_cfg, "pad_token_id", None)
        if pad is None:
            pad = eos[0] if eos else 0
        width = max(len(r.tokens) for r in results)
        new = torch.full((len(results), width), int(pad), dtype=torch.long)
        for i, r in enumerate(results):
            new[i, :len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        sequences = torch.cat([input_ids.to(new.device), new], dim=1)
        if kwargs.get("return_dict_in_generate"):
            return NemoDiffGenerateOutput(sequences=sequences, tokens=[list(r.tokens) for r in results],
                                          stats=[r.to_dict() for r in results])
        return sequences

    def _nemodiff_lm(self, mask_token_id, prompts, mode, cfg, kwargs):
        """On CUDA (unless ``static_cache=False``): the static-shape cache adapter (inlined from
        nemodiff_train/models/static_cache.py), kept on the model while wide enough so its CUDA graphs
        (``cuda_graphs``, default True) are reused across calls; else the dynamic one (models/cached.py)."""
        if self.device.type != "cuda" or not kwargs.get("static_cache", True):
            return HFCachedLM(self, mask_token_id)
        graphs = bool(kwargs.get("cuda_graphs", True))
        need = required_capacity(max(map(len, prompts)), cfg.max_new_tokens, cfg.block_size, [mode])
        lm = getattr(self, "_nemodiff_static", None)
        if lm is None or lm.capacity < need or lm.cuda_graphs != graphs or lm.mask_token_id != int(mask_token_id):
            lm = StaticCachedLM(self, mask_token_id, capacity=need, cuda_graphs=graphs)
            self._nemodiff_static = lm
        return lm


__all__ = ["{cls}", "NemoDiffGenerateOutput"]
'''


def modeling_source(model_type: str, version: str) -> str:
    """The full text of ``modeling_nemodiff.py`` for a ``model_type``."""
    base = base_class_name(model_type)
    dec_imports, dec_body, modules = inline_package(DECODING_DIR, label="decoding")
    lm_imports, lm_body, lm_modules = inline_package(MODELS_DIR, "static_cache", _ADAPTER_ROOTS)
    listing = textwrap.fill(", ".join([f"{m}.py" for m in modules] + [f"models/{m}.py" for m in lm_modules]),
                            width=100, initial_indent="# ", subsequent_indent="# ")
    source = (_HEADER.format(version=version, base=base, modules=listing)
              + "\n".join(_merge_imports(dec_imports + lm_imports)) + "\n\n" + dec_body + "\n\n" + lm_body
              + _FOOTER.format(base=base, cls="NemoDiff" + base, rule="-" * 96))
    try:
        compile(source.encode("utf-8"), MODELING_FILE, "exec")  # bytes: honours coding cookies
    except SyntaxError as e:
        raise ExportError(f"remote_code: the generated {MODELING_FILE} does not compile "
                          f"(line {e.lineno}: {e.msg})") from None
    tree = ast.parse(source)
    names = [n for node in tree.body for n in _defined_names(node) if n != "__all__"]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExportError(f"remote_code: the template and the inlined decoders both define {dupes}")
    return source


def write_remote_code(folder: Path, model_type: str, version: str) -> dict[str, str]:
    """Write ``modeling_nemodiff.py`` into ``folder``; returns the ``auto_map`` entry for config.json.

    No configuration file is needed: the config class stays the base architecture's, so
    ``AutoConfig`` keeps working without remote code and only the model class is remote.
    """
    (folder / MODELING_FILE).write_text(modeling_source(model_type, version))
    return {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{remote_class_name(model_type)}"}
