"""Accounting: the events each delivery produces, and the sinks that record them."""
