"""The benchmark's CPU mode measures distinct layers: no two shapes of the suite shrink to the same one."""
from bench import suite


def test_cpu_scaled_shapes_are_distinct():
    scaled = [suite.scaled_for_cpu(s) for s in suite.SUITE]
    layers = {(s.kind, s.in_features, s.out_features, s.batch, s.size, s.kernel, s.stride, s.padding, s.groups, s.bias)
              for s in scaled}
    assert len(layers) == len(scaled)
    tokens = {s.name: s.batch for s in scaled if s.kind == "linear"}
    assert tokens["linear/4096-4096_t4096"] == 64 and tokens["linear/4096-4096_t16384"] == 256
