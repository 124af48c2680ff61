"""A real Prometheus server for the tests: the shipped launch/prometheus.yml and launch/alerts.yml, pointed at a
test cluster's service-discovery file, scraping and evaluating every second, on 127.0.0.1; and its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import free_port

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
INTERVAL = "1s"  # the shipped 10 s would make a short test run a handful of points


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail("the prometheus server is not installed: `make test` installs it (Debian package prometheus)")
    return found


def config_for_test(discovery: Path, rule_files: list[Path]) -> dict:
    """launch/prometheus.yml with the discovery file, the rule files and the intervals replaced (and nothing else)."""
    config = yaml.safe_load((LAUNCH / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=INTERVAL, evaluation_interval=INTERVAL)
    (job,) = config["scrape_configs"]
    (discovery_config,) = job["file_sd_configs"]
    discovery_config.update(files=[str(discovery)], refresh_interval=INTERVAL)
    assert config["rule_files"] == ["alerts.yml"], "the shipped config no longer loads alerts.yml beside it"
    config["rule_files"] = [str(p) for p in rule_files]
    return config


def scaled_rule(name: str, replacements: dict[str, str]) -> dict:
    """The shipped alert `name` with its thresholds shortened (each `old` text in the rule must be there once), for a
    live test that cannot wait the shipped minutes."""
    rules = {r["alert"]: r for g in yaml.safe_load((LAUNCH / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    text = yaml.safe_dump(rules[name])
    for old, new in replacements.items():
        assert text.count(old) == 1, f"alert {name}: {old!r} is not in the shipped rule once"
        text = text.replace(old, new)
    return yaml.safe_load(text)


class Prometheus:
    def __init__(self, directory: Path, discovery: Path, extra_rules: list[dict] = ()):
        directory.mkdir(parents=True, exist_ok=True)
        rule_files = [LAUNCH / "alerts.yml"]
        if extra_rules:
            rule_files.append(directory / "scaled_alerts.yml")
            rule_files[-1].write_text(yaml.safe_dump({"groups": [{"name": "scaled", "rules": list(extra_rules)}]}))
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump(config_for_test(discovery, rule_files)))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path: str, **params) -> dict | list:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str, at: float | None = None) -> list[dict]:
        """Instant vector: [{"metric": labels, "value": float}]."""
        params = {"query": expression} | ({} if at is None else {"time": at})
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in self.api("query", **params)["result"]]

    def query_range(self, expression: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """Range: [{"metric": labels, "values": [(time, float), ...]}]."""
        data = self.api("query_range", query=expression, start=start, end=end, step=step)
        return [{"metric": r["metric"], "values": [(float(t), float(v)) for t, v in r["values"]]}
                for r in data["result"]]

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def rules(self) -> list[dict]:
        return [r | {"group": g["name"]} for g in self.api("rules")["groups"] for r in g["rules"]]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]
