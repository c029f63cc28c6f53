"""Ops without channel rules, strict mode, user-registered rules, and trace errors (issue 2)."""

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

import autoalign
from autoalign.graph import registry


@pytest.fixture(autouse=True)
def _restore_registry():
    """Every test here may register rules: put the registry back as it was."""
    saved = registry.snapshot()
    yield
    registry.restore(saved)


def _axis(spec, tensor, axis, block=None):
    found = [a for a in spec.axes if a.tensor == tensor and a.axis == axis and a.block == block]
    assert len(found) == 1, f"expected one role for {tensor} axis {axis} block {block}, got {found}"
    return found[0]


# ----------------------------------------------------------------------------- models


def opaque_op(x):
    """An elementwise function kept opaque (autowrap_functions)."""
    return x * 2.0 + 1.0


def wrapped_op(x):
    """The same, kept opaque with torch.fx.wrap."""
    return x * 2.0 + 1.0


torch.fx.wrap("wrapped_op")


class Scale(nn.Module):
    """A learned per-channel scale of (N, C, H, W) features."""

    def __init__(self, c):
        super().__init__()
        self.s = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self, fn=None):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.scale = Scale(4)
        self.b = nn.Conv2d(4, 5, 1)
        self.c = nn.Conv2d(5, 2, 1)
        self.fn = fn

    def forward(self, x):
        h = self.scale(torch.relu(self.a(x)))
        h = torch.relu(self.b(h))
        if self.fn == "opaque":
            h = opaque_op(h)
        elif self.fn == "wrapped":
            h = wrapped_op(h)
        return self.c(h).mean((2, 3))


def _x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 3, 3)


def _net(fn=None):
    torch.manual_seed(0)
    return Net(fn)


def scale_rule(ctx):
    """Channel rule for Scale: a per-channel op along axis 1."""
    lab = ctx.label(ctx.arg(0))
    vec = ctx.channels(lab, 1)
    ctx.role(ctx.module_key("s"), 0, "channel", vec)
    ctx.restrict(vec, "permutation", f"{ctx.name}: per-channel scale")
    return lab


# ----------------------------------------------------------------------------- ops without a rule


@pytest.mark.parametrize("fn, kwargs", [("opaque", {"autowrap_functions": [opaque_op]}), ("wrapped", {})])
def test_function_without_a_rule_freezes_what_it_touches(fn, kwargs):
    net, x = _net(fn), _x()
    spec = autoalign.find_merge_points(net, x, **kwargs)
    name = f"{fn}_op"
    assert any(n.op == "call_function" and n.name == name for n in autoalign.trace(net, x, **kwargs).graph.nodes)
    p = spec.point("b")
    assert p.kind == "frozen" and not p.io
    assert name in p.reason and "register_channel_rule" in p.reason
    assert p.reason.startswith(f"%{name} ")  # fx's format_node of the offending node
    # points the op does not touch are unaffected (the traced-through Scale is a per-channel mul)
    assert spec.point("a").kind == "permutation"
    assert 0 < spec.coverage() < 1
    report = autoalign.check(net, x, **kwargs)
    assert report.ok, str(report)


@pytest.mark.parametrize("leaf", [Scale, "scale"])
def test_leaf_module_without_a_rule_freezes_what_it_touches(leaf):
    net, x = _net(), _x()
    spec = autoalign.find_merge_points(net, x, leaf_modules=[leaf])
    p = spec.point("a")
    assert p.kind == "frozen" and not p.io
    assert "%scale" in p.reason and "register_channel_rule" in p.reason and "leaf" in p.reason
    assert spec.point("b").kind == "linear"
    # the leaf's parameter is reached by the graph but has no role
    assert "scale.s" not in spec.unused
    assert not [a for a in spec.axes if a.tensor == "scale.s"]
    assert autoalign.check(net, x, leaf_modules=[leaf]).ok


@pytest.mark.parametrize(
    "fn, kwargs, node",
    [
        ("opaque", {"autowrap_functions": [opaque_op]}, "opaque_op"),
        ("wrapped", {}, "wrapped_op"),
        (None, {"leaf_modules": [Scale]}, "scale"),
    ],
)
def test_strict_mode_raises_unsupported_op_error(fn, kwargs, node):
    net, x = _net(fn), _x()
    with pytest.raises(autoalign.UnsupportedOpError, match="register_channel_rule") as info:
        autoalign.find_merge_points(net, x, strict=True, **kwargs)
    assert f"%{node} " in str(info.value)
    assert isinstance(info.value, autoalign.AutoalignError)


def test_strict_mode_does_not_raise_for_the_model_output():
    """Freezing the output point is not an unsupported op."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = autoalign.find_merge_points(net, torch.randn(2, 3), strict=True)
    assert spec.point("2").io and spec.point("0").kind == "linear"


# ----------------------------------------------------------------------------- registering rules


def test_registering_a_rule_for_a_leaf_module():
    net, x = _net(), _x()
    autoalign.register_channel_rule(Scale, scale_rule)
    spec = autoalign.find_merge_points(net, x, leaf_modules=[Scale], strict=True)
    p = spec.point("a")
    assert p.dim == 4 and p.kind == "permutation"
    assert p.reason == "scale: per-channel scale"
    ax = _axis(spec, "scale.s", 0)
    assert ax.role == "channel"
    np.testing.assert_array_equal(ax.point_of, np.full(4, spec.index_of("a")))
    np.testing.assert_array_equal(ax.local_of, np.arange(4))
    assert spec.coverage() == 1.0
    report = autoalign.check(net, x, leaf_modules=[Scale])
    assert report.ok, str(report)
    assert report.permuted == 2


def test_register_channel_rule_as_a_decorator_for_a_function():
    net, x = _net("opaque"), _x()

    @autoalign.register_channel_rule(opaque_op)
    def _rule(ctx):
        return ctx.label(ctx.arg(0))

    assert registry.find_rule("call_function", opaque_op) is _rule
    spec = autoalign.find_merge_points(net, x, autowrap_functions=[opaque_op], strict=True)
    assert spec.point("b").kind == "linear"
    assert autoalign.check(net, x, autowrap_functions=[opaque_op]).ok


def test_a_wrong_rule_is_caught_by_the_self_check():
    """A rule that forgets the per-channel parameter gives a spec that check() rejects."""
    net, x = _net(), _x()
    with torch.no_grad():
        net.scale.s.copy_(torch.tensor([0.5, 1.0, 2.0, 4.0]))

    def forgetful(ctx):
        return ctx.label(ctx.arg(0))  # claims Scale is a plain pointwise op

    autoalign.register_channel_rule(Scale, forgetful)
    spec = autoalign.find_merge_points(net, x, leaf_modules=[Scale])
    assert spec.point("a").kind == "linear"
    assert autoalign.check(net, x, spec=spec).ok is False


def test_a_rule_returning_a_wrong_shape_is_a_spec_error():
    net, x = _net(), _x()
    autoalign.register_channel_rule(Scale, lambda ctx: torch.zeros(3, dtype=torch.int64))
    with pytest.raises(autoalign.SpecError, match="channel rule"):
        autoalign.find_merge_points(net, x, leaf_modules=[Scale])


def test_duplicate_registration_needs_replace():
    def other(ctx):
        return None

    autoalign.register_channel_rule(Scale, scale_rule)
    # the same rule again is harmless
    autoalign.register_channel_rule(Scale, scale_rule)
    with pytest.raises(ValueError, match="replace=True"):
        autoalign.register_channel_rule(Scale, other)
    assert registry.find_rule("call_module", Scale, Scale(2)) is scale_rule
    autoalign.register_channel_rule(Scale, other, replace=True)
    assert registry.find_rule("call_module", Scale, Scale(2)) is other

    # built-in rules are protected too
    with pytest.raises(ValueError):
        autoalign.register_channel_rule(nn.Linear, other)
    with pytest.raises(ValueError):
        autoalign.register_channel_rule("view", other)
    with pytest.raises(ValueError):
        autoalign.register_channel_rule(torch.cat, other)


def test_registration_rejects_bad_targets():
    with pytest.raises(TypeError):
        autoalign.register_channel_rule(int, scale_rule)
    with pytest.raises(TypeError):
        autoalign.register_channel_rule(3, scale_rule)


class CallableObject:
    """A callable that is not hashable (it defines __eq__ without __hash__)."""

    def __call__(self, x):
        return x

    def __eq__(self, other):
        return self is other


def _registry_snapshot():
    return list(registry.snapshot())


@pytest.mark.parametrize(
    "target, words",
    [
        (int, ["nn.Module subclass", "int"]),
        (3, ["expected a module class, a function or a method name", "3"]),
        (Scale(2), ["module instance", "Scale", "class"]),
        ("not a name", ["method name", "'not a name'"]),
        (CallableObject(), ["not hashable"]),
        ((), ["empty tuple"]),
        ((Scale, 3), ["3"]),
    ],
)
def test_registration_checks_the_target(target, words):
    before = _registry_snapshot()
    with pytest.raises(autoalign.OptionError) as info:
        autoalign.register_channel_rule(target, scale_rule)
    for w in words:
        assert w in str(info.value)
    assert isinstance(info.value, autoalign.AutoalignError)
    # the decorator form checks the target at once, before any rule is given
    with pytest.raises(autoalign.OptionError):
        autoalign.register_channel_rule(target)
    assert _registry_snapshot() == before  # nothing registered, not even the good part of a tuple


@pytest.mark.parametrize(
    "rule, words",
    [
        ("not a rule", ["must be a callable rule(ctx)", "Scale", "str"]),
        (lambda: None, ["must take one argument", "Scale", "()"]),
        (lambda ctx, extra: None, ["must take one argument", "Scale", "(ctx, extra)"]),
    ],
)
def test_registration_checks_the_rule(rule, words):
    before = _registry_snapshot()
    with pytest.raises(autoalign.OptionError) as info:
        autoalign.register_channel_rule(Scale, rule)
    for w in words:
        assert w in str(info.value)
    assert _registry_snapshot() == before


def test_registration_accepts_rules_callable_with_one_argument():
    def with_default(ctx, why=None):
        return ctx.label(ctx.arg(0))

    class RuleObject:
        def __call__(self, ctx):
            return ctx.label(ctx.arg(0))

    obj = RuleObject()
    assert autoalign.register_channel_rule(Scale, with_default) is with_default
    assert autoalign.register_channel_rule(opaque_op, lambda *args: None) is not None
    assert autoalign.register_channel_rule("my_method", obj) is obj
    assert registry.find_rule("call_method", "my_method") is obj


def test_registration_checks_replace():
    with pytest.raises(autoalign.OptionError, match="replace must be True or False"):
        autoalign.register_channel_rule(Scale, scale_rule, replace="yes")
    assert registry.find_rule("call_module", Scale, Scale(2)) is None


def test_duplicate_registration_raises_option_error_naming_the_target():
    def other(ctx):
        return None

    autoalign.register_channel_rule(Scale, scale_rule)
    with pytest.raises(autoalign.OptionError) as info:
        autoalign.register_channel_rule(Scale, other)
    msg = str(info.value)
    assert "Scale" in msg and "scale_rule" in msg and "replace=True" in msg and "rules=" in msg
    # a tuple with one taken target registers nothing
    with pytest.raises(autoalign.OptionError, match="Linear"):
        autoalign.register_channel_rule((opaque_op, nn.Linear), other)
    assert registry.find_rule("call_function", opaque_op) is None


# ----------------------------------------------------------------------------- per-call rules


def test_per_call_rules_change_the_spec_for_that_call_only():
    net, x = _net(), _x()
    before = _registry_snapshot()
    assert autoalign.find_merge_points(net, x, leaf_modules=[Scale]).point("a").kind == "frozen"
    spec = autoalign.find_merge_points(net, x, leaf_modules=[Scale], strict=True, rules={Scale: scale_rule})
    p = spec.point("a")
    assert p.kind == "permutation" and p.reason == "scale: per-channel scale"
    assert _axis(spec, "scale.s", 0).role == "channel"
    # the global registry is untouched, and the next call does not see the rule
    assert _registry_snapshot() == before
    assert registry.find_rule("call_module", Scale, Scale(2)) is None
    assert autoalign.find_merge_points(net, x, leaf_modules=[Scale]).point("a").kind == "frozen"
    # the self-check takes the same option
    report = autoalign.check(net, x, leaf_modules=[Scale], rules={Scale: scale_rule})
    assert report.ok, str(report)
    assert report.permuted == 2 and report.spec.point("a").kind == "permutation"


def test_per_call_rules_come_before_registered_ones():
    net, x = _net(), _x()

    def forgetful(ctx):
        return ctx.label(ctx.arg(0))

    autoalign.register_channel_rule(Scale, forgetful)
    assert autoalign.find_merge_points(net, x, leaf_modules=[Scale]).point("a").kind == "linear"
    spec = autoalign.find_merge_points(net, x, leaf_modules=[Scale], rules={Scale: scale_rule})
    assert spec.point("a").kind == "permutation"
    assert registry.find_rule("call_module", Scale, Scale(2)) is forgetful
    # built-in rules can be overridden for one call too: a ReLU that freezes what it sees
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    xm = torch.randn(2, 3)

    def freezing(ctx):
        lab = ctx.label(ctx.arg(0))
        ctx.freeze(lab, f"{ctx.name}: frozen for this call")
        return lab

    assert autoalign.find_merge_points(mlp, xm, rules={nn.ReLU: freezing}).point("0").reason == "1: frozen for this call"
    assert autoalign.find_merge_points(mlp, xm).point("0").kind == "linear"


def test_per_call_rules_for_functions_methods_and_tuples():
    net, x = _net("opaque"), _x()

    def passthrough(ctx):
        return ctx.label(ctx.arg(0))

    spec = autoalign.find_merge_points(net, x, autowrap_functions=[opaque_op], rules={(opaque_op, "my_method"): passthrough})
    assert spec.point("b").kind == "linear"
    assert registry.find_rule("call_function", opaque_op) is None
    # discover() on an already traced graph takes them as well
    gm = autoalign.trace(net, x, autowrap_functions=[opaque_op])
    assert autoalign.graph.discover(gm, x, model=net, rules={opaque_op: passthrough}).point("b").kind == "linear"
    assert autoalign.graph.discover(gm, x, model=net).point("b").kind == "frozen"


@pytest.mark.parametrize(
    "rules, words",
    [
        ({int: scale_rule}, ["nn.Module subclass", "int"]),
        ({Scale(2): scale_rule}, ["module instance", "Scale"]),
        ({Scale: "not a rule"}, ["must be a callable rule(ctx)", "Scale"]),
        ({Scale: lambda ctx, extra: None}, ["must take one argument", "Scale"]),
        ({(Scale, opaque_op): scale_rule, Scale: lambda ctx: None}, ["two different rules", "Scale"]),
        ([(Scale, scale_rule)], ["rules must be a mapping", "list"]),
    ],
)
def test_bad_per_call_rules_raise_option_error_naming_the_target(rules, words):
    before = _registry_snapshot()
    # checked before tracing: the untraceable model would raise TraceError otherwise
    with pytest.raises(autoalign.OptionError) as info:
        autoalign.find_merge_points(Outer(), _x(), rules=rules)
    for w in words:
        assert w in str(info.value)
    with pytest.raises(autoalign.OptionError):
        autoalign.check(_net(), _x(), rules=rules)
    assert _registry_snapshot() == before


def test_registry_is_restored_between_tests():
    # scale_rule was registered by earlier tests; the fixture removed it
    assert registry.find_rule("call_module", Scale, Scale(2)) is None
    assert registry.find_rule("call_function", opaque_op) is None


def test_subclasses_inherit_a_rule_only_with_the_same_forward():
    class SameForward(nn.Linear):
        pass

    class OwnForward(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    assert registry.find_rule("call_module", SameForward, SameForward(2, 2)) is registry.find_rule(
        "call_module", nn.Linear, nn.Linear(2, 2)
    )
    assert registry.find_rule("call_module", OwnForward, OwnForward(2, 2)) is None

    torch.manual_seed(0)
    for cls, kind in ((SameForward, "linear"), (OwnForward, "frozen")):
        net = nn.Sequential(cls(3, 4), nn.ReLU(), nn.Linear(4, 2))
        spec = autoalign.find_merge_points(net, torch.randn(2, 3), leaf_modules=[cls])
        assert spec.points[0].kind == kind, cls


# ----------------------------------------------------------------------------- untraceable models


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.body = nn.Sequential(nn.ReLU(), DataDependent())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.conv(x))).mean((2, 3))


def test_untraceable_model_raises_trace_error_naming_the_module():
    net, x = Outer(), _x()
    with pytest.raises(autoalign.TraceError) as info:
        autoalign.find_merge_points(net, x)
    msg = str(info.value)
    assert "'body.1'" in msg and "DataDependent" in msg
    assert "leaf_modules" in msg
    assert isinstance(info.value, autoalign.AutoalignError)


def test_untraceable_module_marked_leaf_is_traceable():
    net, x = Outer(), _x()
    spec = autoalign.find_merge_points(net, x, leaf_modules=[DataDependent])
    p = spec.point("conv")
    assert p.kind == "frozen" and "%body_1" in p.reason and "register_channel_rule" in p.reason

    # with a rule, the point is free again: a sign flip decided by a sum over all
    # features, which a permutation (not a dense map) keeps
    def rule(ctx):
        lab = ctx.label(ctx.arg(0))
        ctx.restrict(lab, "permutation", f"{ctx.name}: decides on a sum over features")
        return lab

    autoalign.register_channel_rule(DataDependent, rule)
    spec = autoalign.find_merge_points(net, x, leaf_modules=[DataDependent])
    assert spec.point("conv").kind == "permutation"
    assert spec.point("conv").reason == "body.1: decides on a sum over features"
    assert autoalign.check(net, x, leaf_modules=[DataDependent]).ok
