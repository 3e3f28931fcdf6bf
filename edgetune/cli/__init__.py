"""Command-line front ends: `edgetune <command>` and `net_runner`."""
