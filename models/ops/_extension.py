"""Lazy, optional build of the compiled multi-scale deformable attention kernels.

Nothing here runs at import time. The first call of ``ms_deform_attn`` on a tensor of a device
type asks :func:`load` for that device type, which compiles (once, cached on disk) and loads the
extension with ``torch.utils.cpp_extension.load`` (ninja), registering the C++/CUDA kernels of the
``sparse_detr::ms_deform_attn`` operator for that dispatch key:

* ``cpu``:  ``csrc/ms_deform_attn_cpu.cpp`` (C++20 compiler as torch requires, ninja; OpenMP via
  at::parallel_for; AVX2/FMA code picked at run time on x86-64);
* ``cuda``: ``csrc/ms_deform_attn_cuda.cpp`` + ``csrc/ms_deform_attn_cuda_kernels.cu`` (also the
  CUDA toolkit; built only when a CUDA device is visible or TORCH_CUDA_ARCH_LIST names the targets).

The two are separate libraries, so a machine without nvcc still gets the CPU kernel.

Build cache: ``$TORCH_EXTENSIONS_DIR/sparse_detr_msda_<device>_<hash>`` when that variable is
set, else ``~/.cache/torch_extensions/<py>_<cu>/sparse_detr_msda_<device>_<hash>``; the hash
covers the kernel sources, so editing them rebuilds. The sources are copied into that folder
(``csrc/``) and built from there, so the build command (``build.ninja``: source paths, ``-I``)
names no checkout: every clone of the same sources loads the same library without rebuilding.
While building, one line says so ("building the CPU kernel ..., once, about 20 s").
GPU targets follow TORCH_CUDA_ARCH_LIST (default: the visible GPUs).
``python -m models.ops.build`` builds ahead of time. The toolkit is found through CUDA_HOME, the
``nvcc`` on PATH (symlinks and small wrapper scripts are followed) or /usr/local/cuda.

If anything is missing or the build fails, :func:`load` says so in its :class:`KernelStatus` and
logs ONE warning per device type, saying what was missing and how to build. :func:`requested_implementation`
reads the environment:

* ``MSDA_IMPL=pytorch``  always use the pure-PyTorch path (never builds anything);
* ``MSDA_IMPL=kernel``   require the compiled kernel (raise instead of falling back);
* ``MSDA_IMPL=auto``     (default) compiled kernel when it can be built, PyTorch otherwise.

The choice between the paths is made in one place, ``ms_deform_attn_func.choose_implementation``;
:func:`kernel_status` reports what happened here without building.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from . import _library

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
BUILD_COMMAND = "python -m models.ops.build"
ENV_IMPL = "MSDA_IMPL"
OP_NAME = "sparse_detr::ms_deform_attn"

_SOURCES = {
    "cpu": ("ms_deform_attn_cpu.cpp",),
    "cuda": ("ms_deform_attn_cuda.cpp", "ms_deform_attn_cuda_kernels.cu"),
}
_HEADERS = ("ms_deform_attn_common.h", "ms_deform_attn_host.h", "ms_deform_attn_cpu_kernels.h",
            "ms_deform_attn_cuda.h")
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
# About how long a first build takes (README, "Multi-scale deformable attention"), for the line said meanwhile.
_BUILD_SECONDS = {"cpu": 20, "cuda": 60}
_IMPL_CHOICES = {"auto": "auto", "": "auto", "pytorch": "pytorch", "torch": "pytorch", "kernel": "kernel",
                 "compiled": "kernel"}


class MissingPrerequisite(RuntimeError):
    """Something the build needs is absent (compiler, ninja, CUDA toolkit, GPU target...)."""


@dataclass(frozen=True, kw_only=True)
class KernelStatus:
    """What :func:`load` found for one device type.

    state: ``"loaded"``; ``"not tried"``; ``"missing"`` (a prerequisite is absent: see reason);
    ``"failed"`` (the build or the load raised: see reason); ``"unsupported"`` (no kernel exists for
    this device type); ``"disabled"`` (MSDA_IMPL=pytorch).
    """

    device_type: str
    state: str
    reason: str = ""
    library: Optional[str] = None
    seconds: Optional[float] = None

    @property
    def loaded(self) -> bool:
        return self.state == "loaded"


_lock = threading.RLock()
_status: dict[str, KernelStatus] = {}
# Warned-once sets, kept apart: an MSDA_IMPL value such as "cuda" must not silence the cuda device's warning.
_warned_values: set[str] = set()  # unknown MSDA_IMPL values
_warned_devices: set[str] = set()  # device types whose kernel is unavailable


# ------------------------------------------------------------------------------------------------
# Environment and prerequisites

def requested_implementation() -> str:
    """``"auto"``, ``"pytorch"`` or ``"kernel"`` from MSDA_IMPL (unknown values count as auto)."""
    raw = os.environ.get(ENV_IMPL, "auto").strip().lower()
    choice = _IMPL_CHOICES.get(raw)
    if choice is None:
        if raw not in _warned_values:
            _warned_values.add(raw)
            logger.warning("%s=%r is not one of auto, pytorch, kernel; using auto", ENV_IMPL, raw)
        return "auto"
    return choice


def _is_cuda_home(path: Optional[Union[str, Path]]) -> bool:
    if not path:
        return False
    home = Path(path)
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder (holding bin/nvcc and include/cuda_runtime.h), or None.

    Looks at CUDA_HOME / CUDA_PATH, then the ``nvcc`` on PATH (following symlinks, and reading a
    small wrapper script such as ``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` for the real
    location), then /usr/local/cuda.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_home(os.environ.get(variable)):
            return str(Path(os.environ[variable]))
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        real = Path(nvcc).resolve()
        if _is_cuda_home(real.parent.parent):
            return str(real.parent.parent)
        try:
            text = real.read_text(errors="ignore") if real.stat().st_size < 65536 else ""
        except OSError:
            text = ""
        for match in re.finditer(r"(/[^\s'\"$;|&]+)/bin/nvcc\b", text):
            if _is_cuda_home(match.group(1)):
                return match.group(1)
    if _is_cuda_home("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def find_nvcc() -> Optional[str]:
    home = find_cuda_home()
    return str(Path(home) / "bin" / "nvcc") if home else None


def _ninja_dir() -> Optional[str]:
    """Folder of a ninja executable: on PATH, next to this Python (an unactivated venv), or pip's."""
    found = shutil.which("ninja")
    if found:
        return str(Path(found).parent)
    candidate = Path(sys.executable).parent / "ninja"
    if candidate.is_file():
        return str(candidate.parent)
    try:
        import ninja  # type: ignore[import-not-found]

        bin_dir = Path(getattr(ninja, "BIN_DIR", ""))
        if (bin_dir / "ninja").is_file():
            return str(bin_dir)
    except Exception:  # noqa: BLE001 - ninja is optional
        pass
    return None


@contextlib.contextmanager
def _path_with(folder: Optional[str]) -> Iterator[None]:
    """Put ``folder`` first on PATH while building (torch runs ``ninja`` through PATH)."""
    old = os.environ.get("PATH", "")
    if folder and folder not in old.split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def missing_prerequisites(device_type: str) -> list[str]:
    """What the build for ``device_type`` lacks on this machine (empty when it can be tried)."""
    missing = []
    registration_error = _library.registration_error()
    if registration_error is not None:
        missing.append(f"the torch.library registration of {OP_NAME} failed ({registration_error})")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler!r} not found; set CXX)")
    if _ninja_dir() is None:
        missing.append("ninja (pip install ninja)")
    if device_type == "cuda":
        if torch.version.cuda is None:
            missing.append("a CUDA build of PyTorch" + (" (ROCm is not supported)" if torch.version.hip else ""))
        elif find_cuda_home() is None:
            missing.append("the CUDA toolkit (nvcc and headers; set CUDA_HOME)")
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            missing.append("a visible CUDA device or TORCH_CUDA_ARCH_LIST naming the GPU targets")
    elif device_type != "cpu":
        missing.append(f"a kernel for {device_type!r} tensors (only cpu and cuda exist)")
    return missing


# ------------------------------------------------------------------------------------------------
# Building and loading

def _source_hash(device_type: str) -> str:
    digest = hashlib.sha1()
    for name in sorted(_SOURCES[device_type] + _HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    return digest.hexdigest()[:10]


def extension_name(device_type: str) -> str:
    return f"sparse_detr_msda_{device_type}_{_source_hash(device_type)}"


def build_directory(device_type: str) -> str:
    """Where torch.utils.cpp_extension builds (and caches) the extension for ``device_type``."""
    with _quiet_cpp_extension_import():
        from torch.utils import cpp_extension

    name = extension_name(device_type)
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    try:  # private helper: the exact folder, including the <py>_<cu> level torch adds
        return cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # noqa: BLE001
        return os.path.join(root or cpp_extension.get_default_build_root(), name)


@contextlib.contextmanager
def _quiet_cpp_extension_import() -> Iterator[None]:
    # Importing cpp_extension on a CUDA build of torch without a GPU logs "No CUDA runtime is found".
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def copy_sources(device_type: str, folder: Path) -> Path:
    """The kernel sources of ``device_type`` (and the headers) in ``folder/csrc``, written only where missing or
    different (an unchanged file keeps its time stamp, so ninja does not rebuild; a new one is written whole,
    then renamed, so a concurrent build never reads half a file). Returns that folder."""
    target = folder / "csrc"
    target.mkdir(parents=True, exist_ok=True)
    for name in _SOURCES[device_type] + _HEADERS:
        data = (CSRC / name).read_bytes()
        path = target / name
        if path.is_file() and path.read_bytes() == data:
            continue
        partial = path.with_name(f".{name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, path)
    return target


def _library_file(folder: Path, name: str) -> Path:
    return folder / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"


def _build(device_type: str, verbose: bool) -> str:
    missing = missing_prerequisites(device_type)
    if missing:
        raise MissingPrerequisite("; ".join(missing))
    with _quiet_cpp_extension_import():
        from torch.utils import cpp_extension
    name = extension_name(device_type)
    folder = Path(build_directory(device_type))
    # Built from a copy in the cache folder: a command naming this checkout's csrc/ would differ from another
    # clone's, and ninja would rebuild on every switch between them.
    sources = copy_sources(device_type, folder)
    if not _library_file(folder, name).is_file():
        logger.warning("building the %s kernel of %s, once, about %d s (cached in %s)", device_type.upper(),
                       OP_NAME, _BUILD_SECONDS[device_type], folder)
    kwargs: dict = {
        "name": name,
        "sources": [str(sources / source) for source in _SOURCES[device_type]],
        "extra_include_paths": [str(sources)],
        "build_directory": str(folder),
        "extra_cflags": ["-O3"],
        "is_python_module": False,
        "verbose": verbose,
    }
    if device_type == "cpu":
        # at::parallel_for is inlined here and uses OpenMP pragmas; the OpenMP runtime is the one
        # libtorch already loaded (same soname).
        kwargs["extra_cflags"] += ["-fopenmp"]
        kwargs["extra_ldflags"] = ["-fopenmp"]
        kwargs["with_cuda"] = False
    else:
        home = find_cuda_home()
        if not _is_cuda_home(cpp_extension.CUDA_HOME):
            # torch guessed the toolkit from a wrapper script or an unset CUDA_HOME: point it at the real one.
            cpp_extension.CUDA_HOME = home
        kwargs["with_cuda"] = True
        kwargs["extra_cuda_cflags"] = ["-O3"]
    with _path_with(_ninja_dir()):
        library = cpp_extension.load(**kwargs)
    key = _DISPATCH_KEY[device_type]
    if not torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key):
        raise RuntimeError(f"{library} loaded but registered no {key} kernel for {OP_NAME}")
    return str(library)


def _summarise(error: BaseException, limit: int = 1500) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    if len(text) > limit:
        text = text[:300] + "\n...\n" + text[-(limit - 300):]
    return text


def _warn_once(status: KernelStatus) -> None:
    if status.device_type in _warned_devices:
        return
    _warned_devices.add(status.device_type)
    needs = "a C++20 compiler and ninja" + (" plus the CUDA toolkit (nvcc, CUDA_HOME)" if status.device_type == "cuda"
                                            else "")
    logger.warning(
        "Compiled multi-scale deformable attention is unavailable for %s tensors (%s: %s). Using the "
        "pure-PyTorch path instead (same results, slower). To build the kernel run `%s` (needs %s); "
        "set %s=pytorch to skip the compiled kernel without this warning.",
        status.device_type, status.state, status.reason, BUILD_COMMAND, needs, ENV_IMPL)


def load(device_type: str, *, verbose: bool = False, warn: bool = True) -> KernelStatus:
    """Build (if needed) and load the kernel for ``device_type`` once per process; never raises
    (except for KeyboardInterrupt and the like). Failures are remembered and warned about once."""
    with _lock:
        status = _status.get(device_type)
        if status is not None:
            return status
        if device_type not in _SOURCES:
            status = KernelStatus(device_type=device_type, state="unsupported",
                                  reason=f"no compiled kernel for {device_type!r} tensors")
        else:
            start = time.perf_counter()
            try:
                library = _build(device_type, verbose)
                status = KernelStatus(device_type=device_type, state="loaded", library=library,
                                      seconds=time.perf_counter() - start)
            except MissingPrerequisite as error:
                status = KernelStatus(device_type=device_type, state="missing", reason=str(error),
                                      seconds=time.perf_counter() - start)
            except Exception as error:  # noqa: BLE001 - any failure means: use the PyTorch path
                status = KernelStatus(device_type=device_type, state="failed", reason=_summarise(error),
                                      seconds=time.perf_counter() - start)
            if status.loaded:
                logger.info("Loaded %s kernels of %s from %s (%.1f s)", device_type, OP_NAME, status.library,
                            status.seconds)
            elif warn:
                _warn_once(status)
        _status[device_type] = status
        return status


def kernel_status(device_type: Optional[str] = None) -> Union[KernelStatus, dict[str, KernelStatus]]:
    """What :func:`load` found, without building anything (``"not tried"`` before the first call)."""
    if device_type is None:
        return {dev: kernel_status(dev) for dev in _SOURCES}
    if requested_implementation() == "pytorch":
        return KernelStatus(device_type=device_type, state="disabled", reason=f"{ENV_IMPL}=pytorch")
    return _status.get(device_type, KernelStatus(device_type=device_type, state="not tried"))
