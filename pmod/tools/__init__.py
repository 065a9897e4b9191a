"""Tooling that is a command, not library: `pmod generate` (`generate`), `pmod chat` (`chat`; both share
`answer`), `pmod flops` (`flops_cli`), `pmod demo` (`demo`, with its synthetic task `synthetic` and routing
maps `viz`) and `pmod compare-strategies` (`compare`, `compare_report`). Tools import the library; the library
never imports tools (one exception, ARCHITECTURE.md: the `pmod_synth` eval task writes its data with `synthetic`).
"""
