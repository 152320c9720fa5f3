"""The Ray runtime and only it: client actor pool, edge servers, aggregator, client state store,
virtual clock. It knows no algorithm: every method decision goes through `pipelines.strategy`.

Submodules import Ray; `actors.clock` and `actors.topology` do not (they are testable without it).
"""
