"""The README's commands as a user copies them: API bodies the API accepts, Ray off Redis's port, the token on every call."""

import json
import re
from pathlib import Path

from serve_app.api import OLD_FIELD_NAMES, StreamRequest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def shell_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    # Join continuation lines, so that a curl and its -d body are one command.
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_every_post_body_in_the_readme_is_one_the_api_accepts():
    bodies = [body for line in shell_lines() if "POST" in line for body in re.findall(r"-d '(\{.*?\})'", line)]
    assert len(bodies) >= 2
    for body in bodies:
        StreamRequest.model_validate_json(body)
        # The README teaches the config's names; the old ones are accepted for one release only.
        assert not set(json.loads(body)) & set(OLD_FIELD_NAMES.values()), body


def test_ray_starts_on_its_own_port_and_redis_is_started_before_it():
    lines = shell_lines()
    ray = [index for index, line in enumerate(lines) if line.startswith("ray start")]
    assert ray and all("--port=6380" in lines[index] for index in ray)
    redis = next(index for index, line in enumerate(lines) if line.startswith("redis-server"))
    assert redis < ray[0]


def test_every_api_call_but_healthz_sends_the_token():
    calls = [line for line in shell_lines() if line.startswith("curl") and ":8000/" in line]
    assert calls
    for call in calls:
        assert ("/healthz" in call) != ('"Authorization: Bearer $TOKEN"' in call), call
