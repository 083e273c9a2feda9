"""How one optimisation step runs. The trainer talks to an engine through the small
interface of `single.SingleEngine`; distributed engines wrap the same model from outside."""

from megatron_mgt.engine.single import SingleEngine

ENGINES = {"single": SingleEngine}


def build_engine(cfg, device):
    return ENGINES[cfg.parallel.engine](cfg, device)


__all__ = ["ENGINES", "SingleEngine", "build_engine"]
