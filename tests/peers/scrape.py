"""Prometheus as the tests see it: GET /metrics over plain HTTP and read the samples back."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

import attrs
from prometheus_client.parser import text_string_to_metric_families

# Sample names a family of each type may export, besides the family's own name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": (),
}


@attrs.frozen
class Scrape:
    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    families: dict[str, str]  # family name -> type

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when it is absent (an unused child)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def labels(self, name: str) -> list[dict[str, str]]:
        return [dict(ls) for (n, ls) in self.samples if n == name]

    def label_names(self) -> set[str]:
        return {label for (_, ls) in self.samples for label, _ in ls}

    def names(self) -> set[str]:
        """Every sample name these families can export (also for families with no sample
        yet, such as a labelled counter never incremented)."""
        names = {n for (n, _) in self.samples}
        for family, kind in self.families.items():
            names.add(family)
            names.update(family + suffix for suffix in _SUFFIXES.get(kind, ()))
        return names


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    families: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(text, samples, families)


def get(url: str, timeout: float = 10) -> tuple[int, Mapping[str, str], bytes]:
    """Blocking GET (call through trio.to_thread.run_sync in trio tests)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def scrape(host: str, port: int) -> Scrape:
    status, headers, body = get(f"http://{host}:{port}/metrics")
    assert status == 200, (status, body[:200])
    assert headers["Content-Type"].startswith("text/plain; version="), headers
    return parse(body.decode())
