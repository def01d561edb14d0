"""cluster.allocator: which library is preloaded into CPU ranks, found on this machine or refused."""
import pytest

from trainer import allocator


@pytest.fixture
def libs(tmp_path, monkeypatch):
    """A library folder this test controls, in place of the machine's."""
    monkeypatch.setattr(allocator, "SEARCH_DIRS", (str(tmp_path),))
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    return tmp_path


def test_auto_prefers_tcmalloc_then_jemalloc_on_cpu_only(libs):
    assert allocator.choose("auto", on_gpu=False) is None  # nothing installed: glibc
    (libs / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.choose("auto", on_gpu=False) == str(libs / "libjemalloc.so.2")
    (libs / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.choose("auto", on_gpu=False) == str(libs / "libtcmalloc_minimal.so.4")
    assert allocator.choose("jemalloc", on_gpu=False) == str(libs / "libjemalloc.so.2")
    assert allocator.choose("auto", on_gpu=True) is None  # host memory does not limit a GPU job
    assert allocator.choose("tcmalloc", on_gpu=True) == str(libs / "libtcmalloc_minimal.so.4")
    assert allocator.choose("glibc", on_gpu=False) is None


def test_preload_env_puts_the_allocator_first_and_keeps_the_users_settings(libs):
    (libs / "libjemalloc.so.2").write_bytes(b"")
    jemalloc = str(libs / "libjemalloc.so.2")
    env = allocator.preload_env("auto", False, {"LD_PRELOAD": "/opt/mine.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{jemalloc}:/opt/mine.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert allocator.preload_env("auto", False, {"MALLOC_CONF": "narenas:2"})["MALLOC_CONF"] == "narenas:2"
    assert allocator.preload_env("glibc", False, {"PATH": "/bin"}) == {"PATH": "/bin"}


def test_an_explicit_allocator_that_is_not_installed_is_a_config_error(libs):
    problem = allocator.missing_problem("jemalloc")
    assert "cluster.allocator=jemalloc" in problem and "apt-get install libjemalloc2" in problem
    assert allocator.missing_problem("auto") is None and allocator.missing_problem("glibc") is None
    (libs / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.missing_problem("jemalloc") is None


def test_validation_names_the_missing_allocator(libs):
    from trainer.config import ConfigError, RootConfig
    from trainer.validate import validate

    cfg = RootConfig()
    cfg.model.name_or_path, cfg.run.dir, cfg.run.name = "builtin:tiny-llama", "/tmp/x", "x"
    cfg.cluster.allocator = "tcmalloc"
    with pytest.raises(ConfigError, match="cluster.allocator=tcmalloc: its library is not installed"):
        validate(cfg, has_cuda=False, check_files=False)


def test_hostfile_launches_export_the_preload_only_when_shardtune_chose_it(libs, tmp_path, monkeypatch):
    from launcher.hostfile import write_remote_env
    from trainer.config import RootConfig

    (libs / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setenv("LD_PRELOAD", "/opt/only-on-this-host.so")
    cfg = RootConfig()
    cfg.cluster.allocator = "glibc"
    lines = write_remote_env(cfg, False, tmp_path).read_text().splitlines()
    assert not any(line.startswith(("LD_PRELOAD=", "MALLOC_CONF=")) for line in lines)
    cfg.cluster.allocator = "jemalloc"
    lines = write_remote_env(cfg, False, tmp_path).read_text().splitlines()
    assert f"LD_PRELOAD={libs / 'libjemalloc.so.2'}:/opt/only-on-this-host.so" in lines
    assert f"MALLOC_CONF={allocator.JEMALLOC_CONF}" in lines
