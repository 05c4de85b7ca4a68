"""Docker cannot run on the development machine, so this checks what can be checked: every shared
library the release binaries need (ldd) comes from a Debian package that docker/Dockerfile's
runtime stage installs (directly or as a dependency), except Swift's own runtime, which the
image links statically (--static-swift-stdlib); and the files the Dockerfile copies exist."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")

# Debian tools, present on every machine of this kind: their absence is a failure, not a skip.
assert shutil.which("ldd") and shutil.which("dpkg") and shutil.which("apt-cache"), "needs ldd, dpkg and apt-cache (Debian)"


def runtime_packages():
    text = open(DOCKERFILE).read()
    stage = text.split("AS runtime", 1)[1]
    install = re.search(r"apt-get install -y --no-install-recommends(.*?)&&", stage, re.S).group(1)
    return set(install.replace("\\", " ").split())


def closure(packages):
    out = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                          "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", *sorted(packages)],
                         capture_output=True, text=True).stdout
    names = set(packages)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            names.add(line.split(":", 1)[1].strip().strip("<>").split(":")[0])
        elif line and not line.startswith(("|", "Depends", "PreDepends")) and ":" not in line:
            names.add(line)
    # Essential packages of debian:bookworm-slim.
    return names | {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5", "libselinux1", "libpcre2-8-0"}


@pytest.mark.parametrize("binary", ["ember-server", "ember"])
def test_binaries_need_only_runtime_packages(binary):
    path = os.path.join(ROOT, ".build", "release", binary)
    assert os.path.exists(path), f"build {binary} first"
    allowed = closure(runtime_packages())
    ldd = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    missing = []
    for line in ldd.splitlines():
        m = re.match(r"\s*(\S+)(?: => (\S+))?", line)
        name, lib = m.group(1), m.group(2)
        if name.startswith("linux-vdso") or "ld-linux" in name:
            continue
        if lib is None or lib == "not":
            missing.append(f"{name} (not found)")
            continue
        real = os.path.realpath(lib)
        if "/swift" in real:        # Swift runtime: linked statically in the image
            continue
        owner = None
        for candidate in (lib, real):
            r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
            if r.returncode == 0:
                owner = r.stdout.split(":")[0].strip()
                break
        if owner is None or owner.split(",")[0] not in allowed:
            missing.append(f"{name} from {owner}")
    assert not missing, f"libraries outside the Dockerfile's runtime packages: {missing}"


def test_dockerfile_inputs_exist():
    text = open(DOCKERFILE).read()
    assert "--static-swift-stdlib" in text and "USER ember" in text and "HEALTHCHECK" in text and "VOLUME" in text
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        if src != ".":
            assert os.path.exists(os.path.join(ROOT, src)), src
    assert os.path.exists(os.path.join(ROOT, "docker", "compose.yaml"))
