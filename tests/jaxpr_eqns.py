"""Every equation of a jaxpr, those of its sub-jaxprs included (scan / cond / jit / shard_map / checkpoint /
custom-VJP bodies), for tests that look for a primitive or a shape in a traced program."""


def all_eqns(jaxpr):
    """The equations of ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``) and, recursively, of every jaxpr in their
    parameters, in program order."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from all_eqns(sub)
