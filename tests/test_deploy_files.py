"""The container files in deploy/docker/ fit the package and each other.

No container runtime runs here, so the files are read, not run: the Dockerfiles' instructions
and compose.yaml are parsed, and every path they copy or mount must exist, every command they
run must be one the image has (Moxy's console scripts, the healthcheck), every port must match
the configuration that is mounted, and every Moxy configuration must pass `moxy check-config`.
The parts that can run on this machine do: the healthcheck script against a real Moxy, and the
LDAP image's directory (deploy/ldap/slapd-init with the files the image copies) in a real slapd.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import ldap3
import pytest
import yaml

from peers.moxy import MoxyProcess
from peers.processes import ServerProcess
from peers.sink import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"
MOXY_DOCKERFILE = DOCKER / "Dockerfile"
LDAP_DOCKERFILE = DOCKER / "ldap" / "Dockerfile"


@attrs.frozen
class Instruction:
    keyword: str
    arguments: str

    @property
    def exec_form(self) -> list[str]:
        """The JSON (exec) form's argv; the test fails for the shell form."""
        argv = json.loads(self.arguments)
        assert isinstance(argv, list), f"{self.keyword} must use the exec (JSON) form"
        return [str(item) for item in argv]


def parse_dockerfile(path: Path) -> list[list[Instruction]]:
    """The instructions of each build stage (a FROM starts one), continuations joined and
    comment lines dropped as Docker does."""
    stages: list[list[Instruction]] = []
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, arguments = logical.strip().partition(" ")
            instruction = Instruction(keyword.upper(), " ".join(arguments.split()))
            if instruction.keyword == "FROM":
                stages.append([])
            assert stages, f"{path}: {instruction.keyword} before FROM"
            stages[-1].append(instruction)
        logical = ""
    return stages


def all_of(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [instruction for instruction in stage if instruction.keyword == keyword]


def one_of(stage: list[Instruction], keyword: str) -> Instruction:
    found = all_of(stage, keyword)
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def copies(stage: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context."""
    result = []
    for instruction in all_of(stage, "COPY"):
        words = shlex.split(instruction.arguments)
        if any(word.startswith("--from=") for word in words):
            continue
        result.append((words[:-1], words[-1]))
    return result


def image_path(stage: list[Instruction], path: str) -> Path:
    """The repository file that the final image has at `path`, through its COPY lines."""
    for sources, destination in copies(stage):
        for source in sources:
            if destination.endswith("/") and path == destination + Path(source).name:
                return ROOT / source
            if not destination.endswith("/") and path == destination:
                return ROOT / source
    raise AssertionError(f"{path} is not copied into the image")


def apt_packages(stage: list[Instruction]) -> set[str]:
    packages: set[str] = set()
    for run in all_of(stage, "RUN"):
        for match in re.finditer(r"apt-get install ([^&|;]+)", run.arguments):
            packages |= {word for word in match.group(1).split() if not word.startswith("-")}
    return packages


def makefile_debs() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    run = re.search(r"^RUN_DEBS\s*:=(.*)$", text, re.MULTILINE)
    test = re.search(r"^TEST_DEBS\s*:=(.*)$", text, re.MULTILINE)
    assert run and test
    return set(run.group(1).split()) | set(test.group(1).replace("$(RUN_DEBS)", "").split())


def check_config(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "check-config", "--config", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"moxy: configuration file {path} is OK\n"


def listen_port(config: Path) -> int:
    listen = tomllib.loads(config.read_text())["server"]["listen"]
    ports = {int(address.rpartition(":")[2]) for address in listen}
    assert len(ports) == 1, listen
    return ports.pop()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


# --- the Moxy image ---------------------------------------------------------------------------


def test_moxy_image_installs_the_package_and_runs_it_as_non_root() -> None:
    build, final = parse_dockerfile(MOXY_DOCKERFILE)
    for stage in (build, final):
        assert re.fullmatch(r"debian:[a-z]+-slim( AS \w+)?", one_of(stage, "FROM").arguments)
        # Only packages CI installs too (so they exist in Debian under these names).
        assert apt_packages(stage) <= makefile_debs()
    assert apt_packages(final) >= {"python3", "python3-gdbm"}  # dbm.gnu for GDBM routes
    for sources, _destination in copies(build) + copies(final):
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    # A regular install from the copied tree, not an editable one.
    installs = [run.arguments for run in all_of(build, "RUN") if "pip install" in run.arguments]
    assert len(installs) == 1 and " -e " not in installs[0] and "--editable" not in installs[0]
    copied = {source for sources, _ in copies(build) for source in sources}
    assert {"pyproject.toml", "README.md", "src"} <= copied
    # The final stage takes the installed venv only.
    assert [c.arguments for c in all_of(final, "COPY") if "--from=" in c.arguments] == [
        "--from=build /opt/moxy /opt/moxy"
    ]
    # Non-root: the user is created in the image and is not root.
    user = one_of(final, "USER").arguments
    assert user not in ("root", "0")
    assert any("useradd" in run.arguments and run.arguments.endswith(f" {user}")
               for run in all_of(final, "RUN"))  # fmt: skip


def test_moxy_image_entrypoint_is_a_console_script_receiving_sigterm_directly() -> None:
    _build, final = parse_dockerfile(MOXY_DOCKERFILE)
    entrypoint = one_of(final, "ENTRYPOINT").exec_form  # exec form: Moxy is PID 1, no shell
    command = one_of(final, "CMD").exec_form
    assert one_of(final, "STOPSIGNAL").arguments == "SIGTERM"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0].startswith("/opt/moxy/bin/")
    assert Path(entrypoint[0]).name in scripts
    argv = [*entrypoint[1:], *command]
    assert argv[:2] == ["serve", "--config"]
    # The command line parses as Moxy's own; the configuration it names is in the image.
    from moxy.cli import _parser

    args = _parser().parse_args(argv)
    assert args.command.__name__ == "_serve"
    check_config(image_path(final, str(args.config)))


def test_moxy_image_port_and_healthcheck_match_its_configuration() -> None:
    _build, final = parse_dockerfile(MOXY_DOCKERFILE)
    default_config = image_path(final, "/etc/moxy/moxy.toml")
    exposed = one_of(final, "EXPOSE").arguments
    assert exposed == str(listen_port(default_config)) and int(exposed) > 1024
    healthcheck = one_of(final, "HEALTHCHECK").arguments
    options, _, test = healthcheck.partition(" CMD ")
    assert re.search(r"--timeout=\d+s", options) and re.search(r"--interval=\d+s", options)
    argv = json.loads(test)
    assert argv[0] == "/opt/moxy/bin/python"
    assert image_path(final, argv[1]) == DOCKER / "healthcheck.py"
    assert argv[2:] == ["--config", "/etc/moxy/moxy.toml"]
    assert (ROOT / "deploy/docker/default/routes").read_text().strip().startswith("#")


# --- the healthcheck, run for real ------------------------------------------------------------


def healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_healthcheck_does_a_noop_round_trip_with_moxy(
    moxy_process: Callable[..., MoxyProcess], tmp_path: Path
) -> None:
    running = moxy_process({"example.test": "127.0.0.1:9"})
    done = healthcheck(running.config_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # A wildcard listen address is asked on loopback, as inside a container.
    wildcard = tmp_path / "wildcard.toml"
    wildcard.write_text(f'[server]\nlisten = ["0.0.0.0:{running.port}"]\n')
    assert healthcheck(wildcard).returncode == 0
    assert "Traceback" not in running.stderr()


def test_healthcheck_fails_in_one_line_when_nothing_answers(tmp_path: Path) -> None:
    config = tmp_path / "moxy.toml"
    config.write_text(f'[server]\nlisten = ["0.0.0.0:{free_port()}"]\n')
    done = healthcheck(config)
    assert done.returncode == 1
    assert re.fullmatch(rf"healthcheck: {re.escape(str(config))}: .*refused.*\n", done.stderr)


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_has_the_cluster_services_with_healthchecks_and_start_order(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {
        "moxy-a", "moxy-b", "redis", "ldap", "sink", "prometheus", "grafana",
    }  # fmt: skip
    with_healthcheck = {name for name, service in services.items() if "healthcheck" in service}
    # The ldap and Moxy images have their own HEALTHCHECK.
    assert one_of(parse_dockerfile(LDAP_DOCKERFILE)[0], "HEALTHCHECK")
    assert one_of(parse_dockerfile(MOXY_DOCKERFILE)[1], "HEALTHCHECK")
    with_healthcheck |= {"ldap", "moxy-a", "moxy-b"}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for needed in depends:
            assert needed in services, f"{name} depends on unknown {needed}"
            if isinstance(depends, dict) and depends[needed]["condition"] == "service_healthy":
                assert needed in with_healthcheck, f"{name} waits for {needed}'s healthcheck"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} is not loopback only"
    for node in ("moxy-a", "moxy-b"):
        service = services[node]
        assert service["hostname"] == node  # [server] node defaults to the host name
        assert set(service["depends_on"]) == {"redis", "ldap", "sink"}
        assert all(c["condition"] == "service_healthy" for c in service["depends_on"].values())
        # Longer than Moxy's graceful stop (shutdown_grace, 30 s by default).
        assert int(service["stop_grace_period"].removesuffix("s")) > 30


def test_compose_builds_and_mounts_only_what_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_compose_nodes_configuration_passes_check_config_and_fits_the_services(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for node in ("moxy-a", "moxy-b"):
        [mount] = services[node]["volumes"]
        source, target, mode = mount.split(":")
        assert (target, mode) == ("/etc/moxy", "ro")
        config = (DOCKER / source / "moxy.toml").resolve()
        check_config(config)
        # The image's EXPOSEd port is the container side of the node's port mapping.
        [mapping] = services[node]["ports"]
        assert int(mapping.rpartition(":")[2]) == listen_port(config)
        assert one_of(parse_dockerfile(MOXY_DOCKERFILE)[1], "EXPOSE").arguments == str(
            listen_port(config)
        )
    settings = tomllib.loads(config.read_text())
    assert settings["routes"]["chain"] == ["redis", "ldap", "file"]
    # Redis: the service name and the port its command line sets.
    redis = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings["routes"]["redis"]["url"])
    assert redis and redis.group(1) in services
    command = services[redis.group(1)]["command"]
    assert command[command.index("--port") + 1] == redis.group(2)
    assert redis.group(2) in services[redis.group(1)]["healthcheck"]["test"]
    # LDAP: the service, the port slapd listens on, and the base its healthcheck asks for.
    [uri] = settings["routes"]["ldap"]["uri"]
    ldap = re.fullmatch(r"ldap://([\w-]+):(\d+)", uri)
    assert ldap and ldap.group(1) in services
    ldap_stage = parse_dockerfile(LDAP_DOCKERFILE)[0]
    slapd_argv = one_of(ldap_stage, "CMD").exec_form
    assert slapd_argv[slapd_argv.index("-h") + 1] == f"ldap://0.0.0.0:{ldap.group(2)}/"
    assert one_of(ldap_stage, "EXPOSE").arguments == ldap.group(2)
    assert settings["routes"]["ldap"]["base"] in one_of(ldap_stage, "HEALTHCHECK").arguments
    # Every destination in the routes file and the cluster's LDAP route is the sink's SMTP port.
    sink_address = services["sink"]["environment"]["MP_SMTP_BIND_ADDR"]
    sink = f"sink:{sink_address.rpartition(':')[2]}"
    routes = (config.parent / "routes").read_text()
    destinations = [line.split()[1] for line in routes.splitlines() if line and line[0] != "#"]
    assert destinations == [sink]
    cluster_ldif = (DOCKER / "ldap" / "cluster.ldif").read_text()
    assert re.findall(r"^moxyDestination: (.*)$", cluster_ldif, re.MULTILINE) == [sink]


def test_prometheus_and_grafana_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    [static] = job["static_configs"]
    assert static["targets"] == ["moxy-a:9325", "moxy-b:9325"]
    assert all(target.split(":")[0] in services for target in static["targets"])
    settings = tomllib.loads((DOCKER / "moxy" / "moxy.toml").read_text())
    # The nodes' metrics endpoint is what Prometheus scrapes.
    assert settings["metrics"]["listen"] == "0.0.0.0:9325"
    [mount] = services["prometheus"]["volumes"]
    assert mount == "./prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    provisioning = DOCKER / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    # Moxy's dashboard is mounted where the dashboard provider looks, and its data source
    # variable finds the provisioned (default) Prometheus.
    [provider] = yaml.safe_load((provisioning / "dashboards" / "moxy.yaml").read_text())[
        "providers"
    ]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [dashboard] = [target for source, target in mounts.items() if source.endswith(".json")]
    assert Path(dashboard).parent == Path(provider["options"]["path"])
    source_file = (DOCKER / next(s for s, t in mounts.items() if t == dashboard)).resolve()
    assert source_file == ROOT / "deploy" / "grafana" / "moxy-dashboard.json"
    variables = json.loads(source_file.read_text())["templating"]["list"]
    [variable] = [v for v in variables if v["type"] == "datasource"]
    assert variable["query"] == source["type"]
    assert source["isDefault"] is True


def test_compose_nodes_count_in_the_cluster_redis(compose: dict[str, Any]) -> None:
    settings = tomllib.loads((DOCKER / "moxy" / "moxy.toml").read_text())
    assert settings["accounting"]["sinks"] == ["file", "redis"]
    assert settings["accounting"]["redis"]["url"] == settings["routes"]["redis"]["url"]
    assert "file" not in settings["log"]  # the message log goes to docker logs


# --- the LDAP image's directory, built and served for real -------------------------------------


@pytest.fixture
def ldap_image_directory(tmp_path: Path) -> Iterator[ServerProcess]:
    """The LDAP image's RUN line (slapd-init with the files it copies) run here, and the
    image's slapd serving the result on a loopback port (as this user, not as openldap)."""
    stage = parse_dockerfile(LDAP_DOCKERFILE)[0]
    [init] = [run.arguments for run in all_of(stage, "RUN") if "slapd-init" in run.arguments]
    words = shlex.split(init.split("&&")[0])
    assert Path(words[0]).name == "slapd-init"
    files = [image_path(stage, word) for word in [words[0], *words[2:]]]
    ldifs = [str(path) for path in files[1:]]
    done = subprocess.run(
        [str(files[0]), str(tmp_path / "ldap"), *ldifs], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    port = free_port()
    argv = one_of(stage, "CMD").exec_form
    argv = [argv[0], "-d", "0", "-F", str(tmp_path / "ldap" / "slapd.d"), "-h",
            f"ldap://127.0.0.1:{port}/"]  # fmt: skip
    server = ServerProcess("slapd", argv, [port], tmp_path / "slapd.log")
    server.start()
    yield server
    server.stop()


def test_ldap_image_directory_serves_the_example_tree_and_the_cluster_route(
    ldap_image_directory: ServerProcess,
) -> None:
    uri = f"ldap://127.0.0.1:{ldap_image_directory.ready_ports[0]}"
    with ldap3.Connection(ldap3.Server(uri), auto_bind=True) as conn:
        conn.search(
            "ou=routes,dc=example,dc=net", "(objectClass=moxyRoute)",
            attributes=["moxyRouteKey", "moxyDestination"],
        )  # fmt: skip
        routes = {str(e.moxyRouteKey): list(e.moxyDestination) for e in conn.entries}
    assert routes["directory.test"] == ["sink:1025"]
    assert routes["shop.example"] == ["203.0.113.7:2600|198.51.100.9"]
    assert len(routes) == 6
