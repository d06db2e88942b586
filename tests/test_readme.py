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


def test_redis_is_waited_for_before_the_ping_that_should_answer_pong():
    # `redis-server --daemonize yes` returns before the daemon listens: a bare ping right after it can be refused.
    lines = shell_lines()
    start = next(index for index, line in enumerate(lines) if line.startswith("redis-server") and "--daemonize yes" in line)
    assert "until redis-cli ping" in lines[start + 1], lines[start + 1]


def test_the_readiness_sign_is_not_a_line_that_serve_run_never_prints():
    # Ray 2.60's `serve run CONFIG` logs "Submitted deploy config successfully" and nothing when the app is up.
    assert "is ready`" not in README
    assert "`serve status`" in README


def test_the_event_table_lists_the_schema_fields_and_version():
    schema = json.loads((Path(__file__).resolve().parents[1] / "pipeline" / "schemas" / "event.schema.json").read_text(encoding="utf-8"))
    section = README.split("### Events on Redis Streams", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:4] for line in section.splitlines()[2:]]
    assert [name.strip().strip("`") for name, _, _ in rows] == list(schema["properties"])
    assert rows[0][2].strip().startswith(f"`{schema['properties']['schema_version']['const']}`")


def test_security_md_starts_ray_as_the_readme_does():
    security = (Path(__file__).resolve().parents[1] / "SECURITY.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", security, flags=re.DOTALL)
    for block in blocks:
        lines = [line.strip() for line in block.splitlines()]
        if any(line.startswith("serve run") for line in lines):
            # `serve run` blocks its terminal, and it must use the auth mode `ray start` turned on.
            assert not any(line.startswith("curl") for line in lines), block
            assert any(line.startswith("export RAY_AUTH_MODE=token") for line in lines), block
