"""The FP32/FP64 reference of a user model, computed once and kept on disk (``check-model``).

A model's reference (the FP32 run, the FP64 run, FP32's reruns and its perturbed sensitivity runs:
everything :func:`harness.run.reference.compute_reference` returns) depends on the model, its data, its
optimizer, the number of updates, the seed, torch, the device and the harness, never on the strategy
checked against it. So it is stored under a key of all of these and reused by later checks (other
strategies, CI reruns); any difference in the key computes a fresh one:

- the factory: its qualified name and the SHA-256 of the source file of the module that defines it, and of
  the module that defines the model's class (with that package's version where it is installed);
- the model's initial weights and the first batch (SHA-256 of their bytes: a factory reading a size from
  the environment builds another model from the same source);
- the case (model name, updates, seed), torch's version, the device and the GPU's name, the harness's
  version and the SHA-256 of its own source.

Where (:mod:`harness.cachedir`): ``--cache DIR``, else ``$MP_HARNESS_CACHE``, else ``$XDG_CACHE_HOME/mp-harness``
(``~/.cache/mp-harness``); ``--no-cache`` (or ``MP_HARNESS_CACHE=off``) turns it off. A file is written
to a temporary name and renamed (a reader never sees half of one); a file that cannot be read or does not
match its key is ignored with a warning and recomputed. Files are read with ``torch.load(weights_only=True)``:
tensors, numbers, strings and containers, no code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import cachedir
from ..cachedir import OFF, cache_dir, configure

__all__ = ["configure", "configured", "add_options", "from_options", "cache_dir", "register", "model_identity",
           "lookup", "DiskEntry", "OFF"]

#: Bumped when the stored layout changes: older files are then never read.
LAYOUT = 1

_IMPORTED = time.time()  # see _changed_since_import
_identities: dict[str, dict[str, Any]] = {}  # scenario name -> model identity (see register)


@contextlib.contextmanager
def configured(cache: str | Path | bool | None) -> Iterator[None]:
    """``check_model(cache=...)``: a directory, False (off) or None (the default), restored on exit."""
    if cache is True or cache is None:
        yield
        return
    saved = cachedir.configured_value()
    configure(OFF if cache is False else cache)
    try:
        yield
    finally:
        configure(saved)


def add_options(parser: Any) -> None:
    """``--cache DIR`` and ``--no-cache`` on a command's parser."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--cache", default=None, metavar="DIR", type=_cache_arg,
                        help="keep the FP32/FP64 reference here across checks (default: $MP_HARNESS_CACHE, "
                             "else $XDG_CACHE_HOME/mp-harness or ~/.cache/mp-harness)")
    g.add_argument("--no-cache", action="store_true", help="compute the reference afresh and keep nothing")


def from_options(args: Any) -> str | bool | None:
    """The ``cache`` argument of :func:`harness.models.model_check.check_model` from parsed options."""
    return False if args.no_cache else args.cache


def _cache_arg(text: str) -> str:
    import argparse
    if not text.strip() or text == OFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory; pass one (e.g. --cache .refcache), or "
                                         "--no-cache to keep nothing")
    return text


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: str | None) -> str | None:
    try:
        return _sha(Path(path).read_bytes()) if path else None
    except OSError:
        return None


def _module_file(name: str) -> str | None:
    mod = sys.modules.get(name)
    try:
        return inspect.getsourcefile(mod) if mod is not None else None
    except TypeError:  # a built-in module
        return None


def _changed_since_import(path: str) -> bool:
    """The file changed after the harness was imported: the code running may be older than the file, and
    its hash would not say what ran."""
    try:
        return os.stat(path).st_mtime > _IMPORTED
    except OSError:
        return True


def _tensors_sha(items: Any) -> str:
    """SHA-256 of (name, dtype, shape, bytes) of every tensor in ``items`` (name -> value pairs)."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}|".encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
        else:
            h.update(repr(t).encode())
    return h.hexdigest()


def _harness_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _package_version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module.split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def model_identity(factory: tuple[str, str] | None, spec: Any) -> dict[str, Any] | None:
    """What determines the reference of ``spec`` besides the case and the device, or None where the factory
    has no source file to hash (a dict, a factory typed into the interpreter). ``factory`` is where the
    factory lives, ``(module, name)`` (:func:`harness.models.user_model.factory_of` reads it off a target)."""
    if factory is None:
        return None
    module, qualname = factory
    importlib.import_module(module)
    path = _module_file(module)
    if path is None or _changed_since_import(path):
        return None
    source = _file_sha(path)
    cls = type(spec.model)
    return {"factory": f"{module}:{qualname}", "factory_source": source,
            "model_class": f"{cls.__module__}.{cls.__qualname__}",
            "model_source": _file_sha(_module_file(cls.__module__)), "model_package": _package_version(cls.__module__),
            "weights": _tensors_sha(spec.model.state_dict().items()),
            "first_batch": _tensors_sha(enumerate(spec.batch_at(0))), "dtype": str(spec.dtype)}


def register(scenario: str, factory: tuple[str, str] | None, spec: Any) -> None:
    """Make the reference of ``scenario``'s cases (the model ``spec``, made by ``factory``: ``(module, name)``)
    cacheable; the identity is hashed only where the cache is on."""
    identity = model_identity(factory, spec) if cache_dir() is not None else None
    if identity is None:
        _identities.pop(scenario, None)
    else:
        _identities[scenario] = identity


@dataclasses.dataclass
class DiskEntry:
    """One reference's place on disk and its full key."""

    path: Path
    key: dict[str, Any]

    def load(self, device: torch.device) -> Any:
        """The stored :class:`~harness.run.reference.Reference`, or None (missing, unreadable or another key:
        a warning says which, and the reference is computed again)."""
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, map_location=device, weights_only=True)
            if not isinstance(data, dict) or data.get("key") != self.key:
                raise ValueError("its key is not this reference's")
            return _reference(data["reference"])
        except Exception as exc:  # noqa: BLE001  (a bad cache file is recomputed, never fatal)
            _note(f"reference cache file {self.path} ignored ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0] if str(exc) else ''}); computing the reference again")
            return None

    def store(self, ref: Any) -> None:
        """Write ``ref`` atomically; a failure to write only warns (the check goes on without the cache)."""
        try:
            cachedir.write_atomic(self.path, lambda f: torch.save({"key": self.key, "reference": _plain(ref)}, f))
        except OSError as exc:
            _note(f"reference cache {self.path.parent} not written ({exc.strerror or exc}); the next check "
                  "computes the reference again")


def _note(text: str) -> None:
    """One line on stderr, also from a worker process (where a warning would go to the worker's filters)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def lookup(case: Any, device: torch.device) -> DiskEntry | None:
    """The disk entry of ``case``'s reference on ``device``, or None where it is not cacheable (not a
    registered user model) or the cache is off."""
    identity = _identities.get(case.scenario.name)
    where = cache_dir()
    if identity is None or where is None:
        return None
    from .. import __version__
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    key = {"layout": LAYOUT, "case": case.key, "model": identity, "torch": str(torch.__version__),
           "device": str(device), "gpu": gpu, "harness": __version__, "harness_source": _harness_sha()}
    digest = _sha(repr(sorted(key.items())).encode())[:32]
    return DiskEntry(where / f"reference-{case.scenario.name[:40]}-{digest}.pt", key)


def _plain(ref: Any) -> dict[str, Any]:
    """A Reference as containers of tensors and numbers (what ``weights_only`` loading accepts)."""
    out = ref.output
    return {"output": {"value": out.value, "grads": out.grads, "losses": out.losses, "kappa": out.kappa,
                       "extra": out.extra, "trace": dataclasses.asdict(out.trace) if out.trace else None},
            "format": ref.format, "check": ref.check, "window": ref.window, "unjudged": ref.unjudged}


def _reference(d: dict[str, Any]) -> Any:
    from ..core.scaling import ScaleTrace
    from ..core.scenario import Output
    from .reference import Reference
    o = d["output"]
    out = Output(value=o["value"], grads=o["grads"], losses=o["losses"], kappa=o["kappa"], extra=o["extra"],
                 trace=ScaleTrace(**o["trace"]) if o["trace"] else None)
    return Reference(out, d["format"], d["check"], d["window"], d["unjudged"])
