"""pytest fixture for tests/support/dnssec.py: ``make_dnssec_lab(zones)`` starts NSD and a
validating unbound for ``zones`` (stopped at the end of the module); tests are skipped
when the Debian packages are missing (``scripts/install-system-deps.sh`` installs them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from support.dnssec import DnssecLab, Zone, missing_tools

MakeDnssecLab = Callable[[list[Zone]], DnssecLab]


@pytest.fixture(scope="module")
def make_dnssec_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeDnssecLab]:
    missing = missing_tools()
    if missing:
        # As the Dovecot and PostgreSQL fixtures do: a missing real part fails, it never
        # turns the DANE tests into silent skips.
        pytest.fail(
            f"missing {', '.join(missing)}: run `make system-deps`",
            pytrace=False,
        )
    labs: list[DnssecLab] = []

    def make(zones: list[Zone]) -> DnssecLab:
        lab = DnssecLab(tmp_path_factory.mktemp("dnssec"), zones)
        labs.append(lab)
        lab.start()
        return lab

    yield make
    for lab in labs:
        lab.stop()
