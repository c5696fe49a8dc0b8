"""``postillon tls check`` as an operator runs it: the real CLI, a config file, real parts.

::

    postillon tls check DOMAIN --config C
        │ [dns] nameservers ─▶ DnsServer (MX, A, _mta-sts TXT)       (MTA-STS cases)
        │                  └▶ unbound (validating) ─stub─▶ NSD        (DANE cases)
        ├─HTTPS (sts_ca_file)─▶ 127.0.0.80:443 mta-sts.<domain>
        └─EHLO, STARTTLS, QUIT─▶ 127.0.0.x:25 receivers (never MAIL)

The MTA-STS world is test_mta_sts's (mx-good listed, mx-bad not), the DANE world
test_dane_server's (mx-good's TLSA names its key, mx-bad's another). Needs root (ports 25
and 443) inside scripts/run-tests.sh's namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from integration.test_dane_server import World as DaneWorld
from integration.test_dane_server import dns as dane_dns
from integration.test_dane_server import world as dane_world  # noqa: F401 (fixture)
from integration.test_mta_sts import (
    PATH,
    World,
    policy,
    receivers,
    world,  # noqa: F401 (fixture)
)
from support.server import default_config, to_toml

pytest_plugins = ["support.dnssec_fixtures"]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="binds 127.0.0.x:25 and :443 (root)"),
]


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    config = default_config(tmp_path, **overrides)
    config["data_dir"] = str(tmp_path / "var")
    path = tmp_path / "postillon.toml"
    path.write_text(to_toml(config))
    return path


def argv(config: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "postillon.cli.main",
        "--config",
        str(config),
        "tls",
        "check",
        *args,
    ]


async def run_async(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def sts_config(w: World, tmp_path: Path) -> Path:
    return write_config(
        tmp_path,
        dns={"nameservers": [w.dns.nameserver], "timeout": 2.0, "attempts": 1},
        outbound={"port": 25, "mta_sts": True, "sts_ca_file": str(w.bundle)},
    )


async def test_mta_sts_enforce_one_matching_one_not(world: World, tmp_path: Path) -> None:  # noqa: F811
    world.web.answers[PATH] = policy("enforce", "mx-good.sts.test")
    config = sts_config(world, tmp_path)
    async with receivers(world) as rx:
        code, out, err = await run_async(config, "enforce.test")
        assert code == 1, out + err
        assert "Traceback" not in err
        assert "MTA-STS: mode enforce" in out and "(fetched" in out
        assert "mx-good.sts.test: matches" in out
        assert "mx-bad.sts.test: does not match" in out
        assert (
            "mx-bad.sts.test  refused: MTA-STS: mx-bad.sts.test does not match the policy "
            "of enforce.test"
        ) in out
        assert "mx-good.sts.test  verify mta-sts=enforce (verified)  → deliver" in out
        assert rx["mx-bad.sts.test"].connections == 0  # refused before connecting
        assert rx["mx-good.sts.test"].messages == []  # QUIT before MAIL

        code, out, err = await run_async(config, "enforce.test", "--json")
        assert code == 1, err
        data = json.loads(out)
        hosts = {h["host"]: h for h in data["hosts"]}
        assert hosts["mx-good.sts.test"]["decision"] == "deliver"
        assert hosts["mx-good.sts.test"]["connection"]["check_result"] == "verified"
        assert hosts["mx-good.sts.test"]["connection"]["sans"] == ["mx-good.sts.test"]
        assert hosts["mx-bad.sts.test"]["decision"] == "refused"
        assert data["sts"]["mode"] == "enforce" and data["exit_code"] == 1


async def test_no_connect_decides_from_dns_and_policy(world: World, tmp_path: Path) -> None:  # noqa: F811
    world.web.answers[PATH] = policy("enforce", "mx-good.sts.test", "mx-bad.sts.test")
    config = sts_config(world, tmp_path)
    async with receivers(world) as rx:
        code, out, err = await run_async(config, "enforce.test", "--no-connect", "--json")
        assert code == 0, out + err
        data = json.loads(out)
        assert [h["decision"] for h in data["hosts"]] == ["deliver", "deliver"]
        assert all(h["connection"] is None for h in data["hosts"])
        assert all(h["requirement"]["mode"] == "verify" for h in data["hosts"])
        assert rx["mx-good.sts.test"].connections == 0
        assert rx["mx-bad.sts.test"].connections == 0


async def test_a_domain_without_mx_or_address(world: World, tmp_path: Path) -> None:  # noqa: F811
    config = sts_config(world, tmp_path)
    code, out, err = await run_async(config, "nowhere.sts.test")
    assert code == 2, out + err
    assert "error:" in out and "Traceback" not in err
    code, out, err = await run_async(config, "nowhere.sts.test", "--json")
    assert code == 2 and json.loads(out)["error"]


def test_dane_matching_and_mismatching_tlsa(
    dane_world: DaneWorld,  # noqa: F811
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path, dns=dane_dns(dane_world), outbound={"port": 25, "mta_sts": False}
    )
    proc = subprocess.run(
        argv(config, "fallback.danes.test"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "mx-good.danes.test  dane (dane-ee)  → deliver" in out
    assert "mx-bad.danes.test  dane  refused:" in out
    proc = subprocess.run(
        argv(config, "fallback.danes.test", "--json"), capture_output=True, text=True, timeout=60
    )
    data = json.loads(proc.stdout)
    hosts = {h["host"]: h for h in data["hosts"]}
    good, bad = hosts["mx-good.danes.test"], hosts["mx-bad.danes.test"]
    assert data["mx_secure"] and good["address_secure"]
    assert good["tlsa_state"] == "secure" and good["tlsa"][0]["usable"]
    assert good["connection"]["check_result"] == "dane-ee"
    assert bad["connection"]["check_result"] == "tlsa-mismatch"
    assert bad["decision"] == "refused"
    assert all(
        c.upper().startswith(("EHLO", "STARTTLS", "QUIT"))
        for c in dane_world.recs["mx-good"].commands
    )
