"""The tools of `make bench-triton-tools`, installed under its work folder and nowhere else:

- a virtualenv (venv/) with genai-perf and perf_analyzer's pip package, every version pinned
  (genai-perf's own dependencies by bench/triton_tools_requirements.txt, a `pip freeze` of a working
  install; none of them is torch);
- perf_analyzer 2.60's wheel is tagged manylinux_2_38 (its binary needs GLIBC_2.38 and
  GLIBCXX_3.4.32) and this Debian 12 has glibc 2.36, so pip will not install it: it is downloaded
  for that platform and unpacked with pypa's `installer`, which does not check the tag, and run
  through Debian 13's glibc loader with Debian 13's libc6, libstdc++6 and libgcc-s1 (pinned below),
  fetched with `apt-get download` from a private apt state (apt/: its own sources list, package
  lists and cache) and unpacked with `dpkg-deb -x` into glibc/. Its other libraries (libssl3,
  libz) are the system's: a newer glibc runs libraries built against an older one;
- bin/perf_analyzer, a wrapper script that runs the binary through that loader. genai-perf calls
  `perf_analyzer` by name, so bin/ goes first on its PATH (`Tools.env`). The wheel's own console
  script (venv/bin/perf_analyzer) is not used: it cannot load the binary here, and it drops the
  binary's exit status.

Nothing is installed system-wide and nothing needs root beyond what `apt-get download` needs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PERF_ANALYZER_VERSION", "GENAI_PERF_VERSION", "DEBIAN_PACKAGES", "Tools", "ensure_tools"]

PERF_ANALYZER_VERSION = "2.60.0"
PERF_ANALYZER_PLATFORM = "manylinux_2_38_x86_64"  # the only x86-64 wheel of 2.60.0
GENAI_PERF_VERSION = "0.0.16"  # the last genai-perf release (its successor is AIPerf)
INSTALLER_VERSION = "0.7.0"  # pypa/installer: installs a wheel without checking its platform tag
LOCK = Path(__file__).with_name("triton_tools_requirements.txt")

# Debian 13's runtime libraries: glibc 2.41 (>= 2.38) and GCC 14's libstdc++ (GLIBCXX_3.4.33).
# A Debian point release can replace a version on the mirror; then `apt-get download` fails with
# the candidate it sees now (printed), and the pin here is what to update.
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGES = {"libc6": "2.41-12+deb13u5", "libstdc++6": "14.2.0-19", "libgcc-s1": "14.2.0-19"}
DEBIAN_MIRROR = "http://deb.debian.org/debian"  # the mirror this machine's apt sources use
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")  # holds trixie's signing keys
MULTIARCH = "x86_64-linux-gnu"
LOADER = f"usr/lib/{MULTIARCH}/ld-linux-x86-64.so.2"  # trixie is merged-/usr: lib64/ is a link to it


@dataclass(frozen=True)
class Tools:
    venv: Path
    bin_dir: Path  # holds the perf_analyzer wrapper
    perf_analyzer: Path  # the wrapper
    genai_perf: Path

    def env(self) -> dict[str, str]:
        """The environment to run the tools in: the wrapper first on PATH (genai-perf runs
        `perf_analyzer` by name), and Hugging Face offline (the tokenizer is a local directory;
        nothing may be downloaded)."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("VIRTUAL_ENV", None)
        return env


def _run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc  # type: ignore[no-any-return]


def ensure_venv(venv: Path, wheels: Path) -> None:
    marker = venv / f".installed-perf-analyzer-{PERF_ANALYZER_VERSION}-genai-perf-{GENAI_PERF_VERSION}"
    if marker.exists():
        return
    print(f"installing perf_analyzer {PERF_ANALYZER_VERSION} and genai-perf {GENAI_PERF_VERSION} into {venv} "
          f"(once, ~2 min) ...", flush=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], "python -m venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "install", f"installer=={INSTALLER_VERSION}"], "pip install installer")
    # The manylinux_2_38 wheel: pip downloads it for that platform (installing it would be refused).
    wheels.mkdir(parents=True, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    _run([*pip, "download", f"perf-analyzer=={PERF_ANALYZER_VERSION}", "--no-deps", "--only-binary=:all:",
          "--platform", PERF_ANALYZER_PLATFORM, "--python-version", py, "-d", str(wheels)], "pip download perf-analyzer")
    wheel = next(wheels.glob(f"perf_analyzer-{PERF_ANALYZER_VERSION}-*-{PERF_ANALYZER_PLATFORM}.whl"))
    _run([str(venv / "bin" / "python"), "-m", "installer", str(wheel)], "python -m installer")
    # genai-perf requires `perf-analyzer` (any version): the 2.60.0 just installed satisfies it.
    _run([*pip, "install", "-r", str(LOCK)], f"pip install -r {LOCK.name}")
    marker.touch()


def _apt_options(apt: Path) -> list[str]:
    opts = {"Dir::Etc::sourcelist": apt / "sources.list", "Dir::Etc::sourceparts": "-",
            "Dir::State::Lists": apt / "lists", "Dir::Cache": apt / "cache", "Dir::State::status": "/dev/null"}
    out = [x for k, v in opts.items() for x in ("-o", f"{k}={v}")]
    if os.geteuid() == 0:  # apt drops root to _apt for downloads, and _apt cannot write our folder
        out += ["-o", "APT::Sandbox::User=root"]
    return out


def ensure_glibc(root: Path, apt: Path, mirror: str = DEBIAN_MIRROR) -> Path:
    """Debian 13's libc6, libstdc++6 and libgcc-s1 at the pinned versions, unpacked under `root`;
    returns the loader."""
    marker = root / ".installed.json"
    if marker.exists() and json.loads(marker.read_text()) == DEBIAN_PACKAGES:
        return root / LOADER
    if platform.machine() != "x86_64":
        raise RuntimeError(f"perf_analyzer's glibc shim is set up for x86-64 only (this machine: {platform.machine()})")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the glibc {DEBIAN_SUITE} libraries are fetched with Debian's apt")
    print(f"fetching Debian {DEBIAN_SUITE}'s {', '.join(f'{k} {v}' for k, v in DEBIAN_PACKAGES.items())} "
          f"into {root} ...", flush=True)
    for d in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial", apt / "debs"):
        d.mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb [signed-by={DEBIAN_KEYRING}] {mirror} {DEBIAN_SUITE} main\n")
    opts = _apt_options(apt)
    _run(["apt-get", *opts, "update"], f"apt-get update ({DEBIAN_SUITE}, private lists)")
    debs = apt / "debs"
    for old in debs.glob("*.deb"):
        old.unlink()
    wanted = [f"{name}={version}" for name, version in DEBIAN_PACKAGES.items()]
    proc = subprocess.run(["apt-get", *opts, "download", *wanted], cwd=debs, capture_output=True, text=True)
    if proc.returncode:
        policy = subprocess.run(["apt-cache", *opts, "policy", *DEBIAN_PACKAGES], capture_output=True, text=True)
        raise RuntimeError(f"apt-get download {' '.join(wanted)} failed: {proc.stderr.strip()[-1000:]}\n"
                           f"the mirror's candidates now (update DEBIAN_PACKAGES in {Path(__file__).name}):\n"
                           f"{policy.stdout.strip()}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    if not (root / LOADER).exists():
        raise RuntimeError(f"{root / LOADER} missing after unpacking {DEBIAN_SUITE}'s libc6")
    marker.write_text(json.dumps(DEBIAN_PACKAGES))
    return root / LOADER


def write_wrapper(path: Path, loader: Path, binary: Path) -> None:
    """A `perf_analyzer` script that runs `binary` with `loader` and the private libraries first,
    then the system's (for libssl, libz); exec keeps the binary's exit status and signals."""
    libs = [loader.parent, Path("/lib") / MULTIARCH, Path("/usr/lib") / MULTIARCH]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n# Written by bench/triton_tools_setup.py: perf_analyzer through Debian 13's glibc.\n"
                    f"exec '{loader}' --library-path '{':'.join(map(str, libs))}' '{binary}' \"$@\"\n")
    path.chmod(0o755)


def ensure_tools(work: Path, mirror: str = DEBIAN_MIRROR) -> Tools:
    work = work.resolve()
    venv = work / "venv"
    ensure_venv(venv, work / "wheels")
    loader = ensure_glibc(work / "glibc", work / "apt", mirror)
    site = next((venv / "lib").glob("python3*/site-packages"))
    binary = site / "perf_analyzer" / "bin" / "perf_analyzer"
    binary.chmod(0o755)  # installer keeps the wheel's file modes, which a wheel may not carry
    tools = Tools(venv, work / "bin", work / "bin" / "perf_analyzer", venv / "bin" / "genai-perf")
    write_wrapper(tools.perf_analyzer, loader, binary)
    proc = subprocess.run([str(tools.perf_analyzer), "--version"], capture_output=True, text=True)
    if proc.returncode or "Perf Analyzer Version" not in proc.stdout + proc.stderr:
        raise RuntimeError(f"{tools.perf_analyzer} --version failed (exit {proc.returncode}): "
                           f"{(proc.stderr + proc.stdout).strip()[-1000:]}")
    return tools
