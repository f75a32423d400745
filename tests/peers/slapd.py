"""A real OpenLDAP slapd for tests, configured the way docs/ldap.md tells an ISP to.

A throwaway cn=config directory is built with `slapadd -n0` (mdb backend, core schema plus Moxy's
shipped deploy/ldap/moxy.ldif, a root DN for tests to write with), deploy/ldap/example.ldif is
loaded with `slapadd -n1`, and slapd serves it on free loopback ports: ldap:// always, ldaps://
and StartTLS too when given certificates (tests/peers/tls.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ldap3
import pytest
from ldap3.utils.dn import escape_rdn

from peers.processes import ServerProcess
from peers.sink import free_port, require_binary
from peers.tls import TlsFiles

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
PACKAGES = "slapd ldap-utils"

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ldap"
SCHEMA_LDIF = DEPLOY / "moxy.ldif"
EXAMPLE_LDIF = DEPLOY / "example.ldif"
CORE_SCHEMA = Path("/etc/ldap/schema/core.ldif")

SUFFIX = "dc=example,dc=net"
ROUTES_BASE = f"ou=routes,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "test-secret"


def _config_ldif(directory: Path, tls: TlsFiles | None) -> str:
    tls_lines = (
        f"olcTLSCACertificateFile: {tls.ca}\n"
        f"olcTLSCertificateFile: {tls.cert}\n"
        f"olcTLSCertificateKeyFile: {tls.key}\n"
        if tls
        else ""
    )
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {directory}/slapd.pid
olcArgsFile: {directory}/slapd.args
{tls_lines}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file://{CORE_SCHEMA}
include: file://{SCHEMA_LDIF}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {SUFFIX}
olcRootDN: {ROOT_DN}
olcRootPW: {ROOT_PASSWORD}
olcDbDirectory: {directory}/data
olcDbIndex: objectClass eq
olcDbIndex: moxyRouteKey eq
olcAccess: {{0}}to * by * read
"""


class Slapd(ServerProcess):
    def __init__(
        self, directory: Path, data: Sequence[Path] = (EXAMPLE_LDIF,), tls: TlsFiles | None = None
    ) -> None:
        binary = require_binary(SLAPD, PACKAGES)
        slapadd = require_binary(SLAPADD, PACKAGES)
        if not CORE_SCHEMA.exists():
            pytest.fail(f"{CORE_SCHEMA} is missing: run `apt-get install {PACKAGES}`")
        config_dir = directory / "slapd.d"
        config_dir.mkdir(parents=True)
        (directory / "data").mkdir()
        config = directory / "config.ldif"
        config.write_text(_config_ldif(directory, tls))
        _run([slapadd, "-n0", "-F", str(config_dir), "-l", str(config)])
        for ldif in data:
            _run([slapadd, "-n1", "-F", str(config_dir), "-l", str(ldif)])
        self.port = free_port()
        self.tls = tls
        self.ldaps_port = free_port() if tls else None
        urls = f"ldap://127.0.0.1:{self.port}/"
        if self.ldaps_port:
            urls += f" ldaps://127.0.0.1:{self.ldaps_port}/"
        ports = [self.port] + ([self.ldaps_port] if self.ldaps_port else [])
        argv = [binary, "-d", "0", "-F", str(config_dir), "-h", urls]
        super().__init__("slapd", argv, ports, directory / "slapd.log")

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def admin(self) -> ldap3.Connection:
        """A connection bound as the root DN, for a test to change the directory."""
        return ldap3.Connection(
            ldap3.Server(self.uri), ROOT_DN, ROOT_PASSWORD, auto_bind=True, raise_exceptions=True
        )

    def add_route(self, key: str, *destinations: str) -> None:
        self.add(
            f"moxyRouteKey={escape_rdn(key)},{ROUTES_BASE}",
            {
                "objectClass": ["moxyRoute"],
                "moxyRouteKey": [key],
                "moxyDestination": list(destinations),
            },
        )

    def add(self, dn: str, attributes: Mapping[str, Sequence[str]]) -> None:
        with self.admin() as conn:
            conn.add(dn, attributes=dict(attributes))  # type: ignore[no-untyped-call]


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    """slapd serving deploy/ldap/example.ldif on ldap://127.0.0.1:<port>; stopped at teardown."""
    server = Slapd(tmp_path / "slapd")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def slapd_tls(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Slapd]:
    """Like `slapd`, also offering StartTLS and ldaps:// with a certificate for localhost."""
    server = Slapd(tmp_path / "slapd", tls=tls_files)
    server.start()
    yield server
    server.stop()
