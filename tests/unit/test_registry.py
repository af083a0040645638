"""The model registry: parts found in installed packages, assembled once, verified by size, header and sha256;
short names resolved where a model path is accepted. Small fake GGUF files in fake packages."""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from metronome.cli import main
from metronome.config import STALE_PARTIAL_S, ParamError
from metronome.model import registry
from metronome.model.errors import ModelFileError, ModelInstallError, ModelNotFoundError
from metronome.model.loader import load
from metronome.model.registry import Assembly, Header, Part, RegisteredModel

HEADER = Header("llama", layers=3, width=8, vocab=16, context=256, chat_template=True)


def _gguf_bytes(tmp: Path, layers: int = 3) -> bytes:
    import gguf

    path = tmp / "fake.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_embedding_length(8)
    w.add_context_length(256)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _packages(root: Path, data: bytes, n: int, prefix: str) -> tuple[Part, ...]:
    """`data` split into `n` installed fake packages under `root` (on sys.path), part i in prefix<i>/data/."""
    cuts = np.linspace(0, len(data), n + 1).astype(int)
    parts = []
    for i in range(1, n + 1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('the registry must not import a part package')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data[cuts[i - 1] : cuts[i]])
        parts.append(Part(f"{prefix.replace('_', '-')}{i}", "1.0", f"{prefix}{i}", f"data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered 3-part model whose packages are installed, the registry holding only it, a fresh cache."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    data = _gguf_bytes(tmp_path)
    model = RegisteredModel(
        name="fake-1b",
        title="Fake 1B",
        quant="F32",
        filename="fake-1b.gguf",
        parts=_packages(site, data, 3, "fake_model_part"),
        assembly=Assembly.CONCAT,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        header=HEADER,
        license="none",
    )
    monkeypatch.setattr(registry, "MODELS", (model,))
    monkeypatch.setattr(registry, "DEFAULT_MODEL", "fake-1b")
    monkeypatch.setenv("METRONOME_MODEL_CACHE", str(tmp_path / "cache"))
    return model, data


def test_assembles_once_verified(fake, tmp_path, monkeypatch):
    model, data = fake
    path = registry.resolve("fake-1b")
    assert path == tmp_path / "cache" / "fake-1b.gguf"
    assert path.read_bytes() == data
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {"fake-1b.gguf", "fake-1b.gguf.verified"}
    # the second resolve trusts the stamp: no hashing, no reassembly
    monkeypatch.setattr(registry, "sha256_file", lambda p: pytest.fail("hashed again"))
    monkeypatch.setattr(registry, "assemble", lambda *a: pytest.fail("assembled again"))
    assert registry.resolve("fake-1b") == path
    assert registry.resolve(None) == path  # the default model goes through the registry too


def test_the_stamp_vouches_for_a_cache_path_with_spaces(fake, tmp_path, monkeypatch):
    """The stamp's line was split on spaces, so a cache under "My Models/" never matched: every load hashed
    the whole file again (a second for 0.5 GB)."""
    monkeypatch.setenv("METRONOME_MODEL_CACHE", str(tmp_path / "my model cache"))
    path = registry.resolve("fake-1b")
    monkeypatch.setattr(registry, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert registry.resolve("fake-1b") == path


def test_sha256_mismatch_is_refused(fake, tmp_path, monkeypatch):
    model, data = fake
    monkeypatch.setattr(registry, "MODELS", (replace(model, sha256="0" * 64),))
    with pytest.raises(ModelInstallError, match=r"sha256 [0-9a-f]{64}, but 'fake-1b' is pinned to 0{64}; refused"):
        registry.resolve("fake-1b")
    assert not (tmp_path / "cache" / "fake-1b.gguf").exists()  # nothing left under the model's name
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_a_stamp_vouches_only_for_the_sha256_pinned_now(fake, tmp_path):
    """A stamp remembers the sha256 a file was verified against. After an upgrade that pins another sha256,
    the stamp left by the old pin must not let the unchanged (now wrong) file through unhashed."""
    model, _ = fake
    path = registry.resolve("fake-1b")  # verified, stamped under the current pin
    registry.verify(model, path)  # the stamp vouches: no error
    with pytest.raises(ModelInstallError, match="refused"):
        registry.verify(replace(model, sha256="0" * 64), path)


def test_header_mismatch_is_refused(fake, tmp_path, monkeypatch):
    model, _ = fake
    monkeypatch.setattr(registry, "MODELS", (replace(model, header=replace(HEADER, layers=24, vocab=151936)),))
    with pytest.raises(ModelInstallError, match=r"layers 3 \(expected 24\), vocab 16 \(expected 151936\); refused"):
        registry.resolve("fake-1b")
    assert not (tmp_path / "cache" / "fake-1b.gguf").exists()


def test_a_changed_cached_file_is_refused(fake, tmp_path):
    path = registry.resolve("fake-1b")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, same header, one byte of tensor data flipped
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(1, 1))  # a new modification time: the stamp no longer vouches for it
    with pytest.raises(ModelInstallError, match="refused"):
        registry.resolve("fake-1b")
    path.write_bytes(bytes(raw[:-5]))
    with pytest.raises(ModelInstallError, match=r"bytes, but 'fake-1b' is \d+ bytes; refused"):
        registry.resolve("fake-1b")


def test_a_changed_part_is_refused(fake, tmp_path):
    model, _ = fake
    part = tmp_path / "site" / model.parts[2].module / model.parts[2].file
    raw = bytearray(part.read_bytes())
    raw[-1] ^= 1  # tensor data: only the hash can tell
    part.write_bytes(bytes(raw))
    with pytest.raises(ModelInstallError, match="the parts of 'fake-1b' as installed: sha256"):
        registry.resolve("fake-1b")
    part = tmp_path / "site" / model.parts[0].module / model.parts[0].file
    raw = bytearray(part.read_bytes())
    raw[0] ^= 1  # the magic: the header no longer reads
    part.write_bytes(bytes(raw))
    with pytest.raises(ModelInstallError, match="not a readable GGUF file"):
        registry.resolve("fake-1b")


def test_missing_part_says_how_to_install(fake, tmp_path):
    model, _ = fake
    (tmp_path / "site" / model.parts[2].module / model.parts[2].file).unlink()
    with pytest.raises(ModelInstallError, match=r"1 of its 3 packages missing.*`metronome models install fake-1b`"):
        registry.resolve("fake-1b")


def test_unknown_name_names_the_parameter(fake):
    with pytest.raises(ModelNotFoundError, match=r"^draft='no-such-model': no such file or folder.*fake-1b") as err:
        registry.resolve("no-such-model", param="draft")
    assert err.value.param == "draft"
    assert isinstance(err.value, ParamError) and isinstance(err.value, ModelFileError)
    with pytest.raises(ModelNotFoundError, match=r"^model='qwen9'") as err:
        load("qwen9")
    assert err.value.param == "model"


def test_existing_paths_pass_through(fake, tmp_path):
    f = tmp_path / "fake.gguf"  # written by the fixture
    assert registry.resolve(str(f)) == f
    assert registry.resolve(tmp_path) == tmp_path


def test_install_runs_pip_without_dependencies(fake, tmp_path, monkeypatch):
    """`install` runs pip with --no-deps and the exact pins, then assembles and verifies."""
    model, _ = fake
    log = tmp_path / "pip-args.txt"
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        textwrap.dedent(f"""
        import sys
        open({str(log)!r}, "w").write(" ".join(sys.argv[1:]))
        """)
    )
    path = registry.install(model, pip=(sys.executable, str(fake_pip)))
    assert log.read_text() == "install --no-deps fake-model-part1==1.0 fake-model-part2==1.0 fake-model-part3==1.0"
    assert path.is_file()
    failing = tmp_path / "failing_pip.py"
    failing.write_text("raise SystemExit(3)\n")
    with pytest.raises(ModelInstallError, match=r"failed \(exit 3\)"):
        registry.install(model, pip=(sys.executable, str(failing)))


def test_install_repairs_a_bad_assembled_file(fake, tmp_path):
    """Every refusal of a bad assembled file says to run `metronome models install`, which verified the
    same file again and refused it for ever: it now assembles the file again from the parts."""
    model, data = fake
    path = registry.resolve("fake-1b")
    path.write_bytes(data[: len(data) // 2])  # cut short (a copy that died, or other pins under this name)
    with pytest.raises(ModelInstallError, match="models install fake-1b"):
        registry.resolve("fake-1b")
    assert registry.install(model, pip=(sys.executable, "-c", "pass")) == path
    assert path.read_bytes() == data and registry.resolve("fake-1b") == path


def test_a_read_only_model_cache_still_resolves_a_verified_file(fake, tmp_path, monkeypatch):
    """The stamp is only a shortcut: a cache that cannot be written made every command fail with an OSError,
    the default model's too."""
    path = registry.resolve("fake-1b")
    (tmp_path / "cache" / "fake-1b.gguf.verified").unlink()

    def read_only(*_a, **_k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    assert registry.resolve("fake-1b") == path


def test_models_command_lists_and_installs(fake, tmp_path, capsys, monkeypatch):
    model, _ = fake
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "fake-1b (default)" in out and "GGUF F32" in out and "256" in out
    assert out.splitlines()[1].split()[2] == "yes"  # parts installed: usable (assembled on first use)
    (tmp_path / "site" / model.parts[0].module / model.parts[0].file).unlink()
    assert main(["models"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "no"
    assert main(["models", "path", "fake-1b"]) == 2  # not installed: the error says how to install
    assert "metronome models install fake-1b" in capsys.readouterr().err


def test_registry_entries_are_consistent():
    names = registry.names()
    assert len(set(names)) == len(names)
    assert registry.DEFAULT_MODEL in names
    for m in registry.MODELS:
        assert len({p.package for p in m.parts}) == len(m.parts)
        assert all("==" in r for r in m.requirements)
    with pytest.raises(ValueError, match="sha256"):
        replace(registry.MODELS[0], sha256="abc")
    with pytest.raises(ValueError, match="exactly one package"):
        replace(registry.MODELS[0], parts=registry.MODELS[2].parts)


def test_ci_models_are_installed_by_make_install():
    """The models CI tests with are the ones `make install` pins (the Makefile's MODELS list)."""
    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    for m in registry.MODELS:
        for p in m.parts:
            pinned = p.requirement in makefile or (p.package.rstrip("0123456789") + "$(i)==" + p.version in makefile)
            assert pinned == m.ci, f"{p.requirement}: in the Makefile's MODELS list: {pinned}, registry ci={m.ci}"


def test_a_file_changed_in_place_with_its_mtime_kept_is_verified_again(fake, tmp_path, monkeypatch):
    """The stamp was keyed by size and mtime: a copy that keeps the mtime (`cp -p`, `rsync -t`) over the
    assembled file kept the stamp, and other bytes passed as the pinned model."""
    import os

    model, data = fake
    path = registry.resolve("fake-1b")
    assert registry.verified_sha256(path) == model.sha256  # what the plan cache's key reads instead of hashing
    st = path.stat()
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    with open(path, "r+b") as fh:
        fh.write(bytes(changed))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert registry.verified_sha256(path) is None
    with pytest.raises(ModelInstallError, match="refused"):
        registry.resolve("fake-1b")


def test_an_assembly_sweeps_what_killed_ones_left(fake, tmp_path):
    """A killed assembly left a hidden .partial file as large as the model, never removed."""
    import os
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    old, fresh = cache / ".fake-1b.gguf.abc.partial", cache / ".fake-1b.gguf.def.partial"
    for left in (old, fresh):
        left.write_bytes(b"x" * 100)
    then = time.time() - STALE_PARTIAL_S - 60
    os.utime(old, (then, then))
    registry.resolve("fake-1b")
    assert not old.exists() and fresh.exists()  # a recent one may be another process's, assembling now


def test_a_registry_entry_is_checked_when_declared(fake):
    """An entry with a zero size, no parts, a name that is not a short lower-case name, or an in-place file
    spread over several packages is an error where it is written, not a confusing failure at install."""
    model, _ = fake
    with pytest.raises(ValueError, match="must be positive"):
        replace(model, size=0)
    with pytest.raises(ValueError, match="parts is empty"):
        replace(model, parts=())
    for name in ("Fake-1b", "fake_1b", "fake 1b", "-fake"):
        with pytest.raises(ValueError, match="lower-case"):
            replace(model, name=name)
    with pytest.raises(ValueError, match="exactly one package"):
        replace(model, assembly=Assembly.IN_PLACE, parts=model.parts[:2])


def test_numbered_parts_count_from_one_with_a_zero_based_index_for_file_names():
    """`_numbered` makes the pinned part list of the split models (gemma's files are .part00.., its
    packages ...part1..): every part, with its number and index in the right places."""
    parts = registry._numbered("pkg-part", "pkg_part", "2.0", 3, "data/f.part{i0:02d}.{i}")
    assert parts == (
        Part("pkg-part1", "2.0", "pkg_part1", "data/f.part00.1"),
        Part("pkg-part2", "2.0", "pkg_part2", "data/f.part01.2"),
        Part("pkg-part3", "2.0", "pkg_part3", "data/f.part02.3"),
    )


def test_a_plain_module_of_a_parts_name_is_no_part(fake, tmp_path):
    """A part lives in a package folder; a plain module of that import name (not a package) has no
    folder to hold the file: the part is missing, not a TypeError."""
    (tmp_path / "site" / "plain_module_part.py").write_text("")
    assert registry.part_path(Part("plain-module-part", "1.0", "plain_module_part", "data/x.bin")) is None


def test_an_in_place_model_not_installed_says_how_to_install(fake, tmp_path, monkeypatch):
    """An in-place model whose package is missing is refused with the install command (it was an
    AttributeError on None); a folder squatting an assembled file's name does not make a model installed."""
    model, _ = fake
    in_place = replace(
        model,
        name="fake-in-place",
        assembly=Assembly.IN_PLACE,
        parts=(Part("absent", "1.0", "absent_pkg_x", "f.gguf"),),
    )
    monkeypatch.setattr(registry, "MODELS", (model, in_place))
    assert not registry.is_installed(in_place)
    with pytest.raises(ModelInstallError, match=r"not installed .*`metronome models install fake-in-place`"):
        registry.resolve("fake-in-place")
    (tmp_path / "site" / model.parts[0].module / model.parts[0].file).unlink()
    (tmp_path / "cache" / model.filename).mkdir(parents=True)
    assert not registry.is_installed(model)


def test_find_takes_exact_names_and_names_the_parameter(fake):
    """A prefix of a registered name is not that model, and the error names the flag it came from."""
    assert registry.find("fake-1b").name == "fake-1b"
    with pytest.raises(ModelNotFoundError, match=r"draft='fake'.*known: fake-1b") as err:
        registry.find("fake", param="draft")
    assert err.value.param == "draft"


def test_the_default_model_is_the_named_default_not_the_first_entry(fake, tmp_path, monkeypatch):
    model, _ = fake
    other = replace(model, name="other-1b", filename="other-1b.gguf", sha256="0" * 64)
    monkeypatch.setattr(registry, "MODELS", (other, model))
    assert registry.resolve(None) == tmp_path / "cache" / "fake-1b.gguf"


def test_an_existing_path_wins_over_a_registered_name(fake, tmp_path, monkeypatch):
    """`--model NAME` where a file or folder of that name exists uses it as it is (the docstring's order)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake-1b").mkdir()
    assert registry.resolve("fake-1b") == Path("fake-1b")
    assert not (tmp_path / "cache" / "fake-1b.gguf").exists()


def test_a_blank_model_is_called_empty(fake):
    with pytest.raises(ModelNotFoundError, match="model is empty"):
        registry.resolve("   ")


def test_the_assembled_file_is_readable_by_everyone(fake):
    """mkstemp makes the temporary file private (0600): the model, a shared cache's file, must be 0644."""
    assert registry.resolve("fake-1b").stat().st_mode & 0o777 == 0o644


def test_a_cached_file_with_another_header_is_refused_by_its_header(fake):
    """verify() names the header fact that differs (not only a sha256 mismatch), and a refusal of a model of
    more than two parts names its first and last pins."""
    model, _ = fake
    path = registry.resolve("fake-1b")
    (path.parent / "fake-1b.gguf.verified").unlink()
    other = replace(model, header=replace(HEADER, context=512))
    with pytest.raises(ModelInstallError, match=r"context 256 \(expected 512\); refused") as err:
        registry.verify(other, path)
    assert "(fake-model-part1==1.0 ... fake-model-part3==1.0)" in str(err.value)


def test_a_header_without_a_template_or_context_reads_as_such(tmp_path):
    """A missing chat template reads as False and a missing context length as -1: neither matches a
    registered header by default."""
    import gguf

    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(3)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert registry.read_header(path) == Header("llama", 3, 8, 16, context=-1, chat_template=False)


def test_pip_running_past_its_time_is_refused(fake, monkeypatch):
    model, _ = fake
    monkeypatch.setattr(registry, "PIP_TIMEOUT_S", 0.5)
    with pytest.raises(ModelInstallError, match=r"pip ran past 0.5 s; try again"):
        registry.install(model, pip=(sys.executable, "-c", "import time; time.sleep(30)"))


def test_packages_pip_just_installed_are_found_in_the_same_process(fake, tmp_path):
    """The import system caches a folder's listing: without invalidate_caches() a part package pip put there
    after the registry last looked (within the folder's timestamp granularity) was missing."""
    model, _ = fake
    site, away = tmp_path / "site", tmp_path / "away"
    away.mkdir()
    os.rename(site / model.parts[2].module, away / model.parts[2].module)
    assert registry.missing_parts(model) == [model.parts[2]]  # the listing is now cached without it
    st = site.stat()
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        f"import os\nos.rename({str(away / model.parts[2].module)!r}, {str(site / model.parts[2].module)!r})\n"
        f"os.utime({str(site)!r}, ns=({st.st_atime_ns}, {st.st_mtime_ns}))\n"
    )
    assert registry.install(model, pip=(sys.executable, str(fake_pip))).is_file()


def test_models_command_columns(fake, tmp_path, capsys, monkeypatch):
    """`metronome models`: size in MB, the chat-template column says a base model, the title, and the
    columns aligned across rows."""
    model, _ = fake
    base = replace(
        model,
        name="fake-base",
        title="Fake Base Model",
        filename="fake-base.gguf",
        size=98_362_432,
        header=replace(HEADER, chat_template=False),
    )
    monkeypatch.setattr(registry, "MODELS", (model, base))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("fake-base"))
    assert "98 MB" in row and "no (base model)" in row and row.endswith("Fake Base Model")
    assert len({line.index("GGUF") if "GGUF" in line else line.index("format") for line in lines}) == 1


def test_models_install_and_path_commands(fake, tmp_path, capsys, monkeypatch):
    """`models install` installs every name given and prints each verified path; it needs at least one
    name; `models path` prints the file and succeeds."""
    installed = []
    monkeypatch.setattr(registry, "install", lambda m: installed.append(m.name) or tmp_path / m.filename)
    assert main(["models", "install", "fake-1b", "fake-1b"]) == 0
    assert installed == ["fake-1b", "fake-1b"]
    assert capsys.readouterr().out.splitlines() == [f"fake-1b: {tmp_path / 'fake-1b.gguf'} (sha256 verified)"] * 2
    with pytest.raises(SystemExit) as err:
        main(["models", "install"])
    assert err.value.code == 2
    capsys.readouterr()
    assert main(["models", "path", "fake-1b"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "fake-1b.gguf")
