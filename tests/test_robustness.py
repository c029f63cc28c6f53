"""Bad inputs and awkward models: autoalign fails clearly or succeeds correctly.

One test per bad input (docs/robustness.md lists them with the message the user sees).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import autoalign
from autoalign import DataError, MergeError, ModelError, NonFiniteError, OptionError


def _mlp(seed: int, d_in: int = 4, hidden: int = 8, d_out: int = 3, bn: bool = False, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


def _data(n: int = 3, d_in: int = 4, batch: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=g) for _ in range(n)]


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


# --- the hierarchy ---------------------------------------------------------------------


def test_error_hierarchy_keeps_old_except_clauses_working():
    for cls in (ModelError, DataError, NonFiniteError, OptionError):
        assert issubclass(cls, MergeError) and issubclass(cls, autoalign.AutoalignError) and issubclass(cls, ValueError)
    assert issubclass(OptionError, TypeError)  # unknown keyword arguments used to raise TypeError
    for name in ("ModelError", "DataError", "NonFiniteError", "OptionError"):
        assert name in autoalign.__all__


# --- models ----------------------------------------------------------------------------


def test_different_widths_name_the_first_differing_parameter():
    with pytest.raises(ModelError, match=r"parameter '0.weight' has shape \(9, 4\) in models\[1\] but \(8, 4\) in models\[0\]"):
        autoalign.merge([_mlp(0), _mlp(1, hidden=9)], _data())


def test_missing_parameter_is_named():
    with pytest.raises(ModelError, match=r"models\[1\] has no parameter '2.weight'"):
        autoalign.merge([_mlp(0), _mlp(1, bn=True)], _data())


def test_different_classes_are_named():
    class Other(nn.Sequential):
        pass

    with pytest.raises(ModelError, match=r"models\[1\] is a Other but models\[0\] is a Sequential"):
        autoalign.merge([_mlp(0), Other(*_mlp(1))], _data())


def test_empty_model_list():
    with pytest.raises(ModelError, match="at least one model"):
        autoalign.merge([], _data())


def test_models_not_a_list():
    with pytest.raises(ModelError, match="must be a list or tuple"):
        autoalign.merge(_mlp(0), _data())


def test_single_model_returns_a_copy_with_a_warning():
    m = _mlp(0)
    with pytest.warns(UserWarning, match="single model"):
        out = autoalign.merge([m], _data())
    assert out is not m
    _assert_same_state(out.state_dict(), m.state_dict())


def test_mixed_dtypes_are_named():
    with pytest.raises(ModelError, match=r"parameter '0.weight' is torch.float64 in models\[1\] but torch.float32"):
        autoalign.merge([_mlp(0), _mlp(1).double()], _data())


def test_models_on_different_devices_are_named():
    with pytest.raises(ModelError, match=r"different devices \['cpu', 'meta'\].*device="):
        autoalign.merge([_mlp(0), _mlp(1).to("meta")], _data())


def test_nan_parameter_is_named():
    bad = _mlp(0)
    with torch.no_grad():
        bad[2].weight[0, 0] = float("nan")
    for aligner in ("cca", "identity"):  # identity used to average the NaN in silently
        with pytest.raises(NonFiniteError, match=r"parameter '2.weight' of models\[0\] contains NaN/Inf"):
            autoalign.merge([bad, _mlp(1)], _data(), aligner=aligner)


def test_nan_buffer_is_named():
    bad = _mlp(0, bn=True)
    bad[1].running_var[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"buffer '1.running_var' of models\[0\] contains NaN"):
        autoalign.merge([bad, _mlp(1, bn=True)], _data())


def test_tied_parameters_that_differ_between_models():
    a, b = _mlp(0), _mlp(1)
    for m in (a, b):
        m.extra = nn.Linear(4, 8)
    a.extra.weight = a[0].weight  # a ties two keys, b does not
    with pytest.raises(ModelError, match=r"models\[1\] ties parameters \[\] but models\[0\] ties \[\['0.weight', 'extra.weight'\]\]"):
        autoalign.merge([a, b], _data())


class _Tied(nn.Module):
    """An MLP whose first weight is also registered under a second module that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 3)
        self.alias = nn.Linear(4, 8)
        self.alias.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.act(self.emb(x)))


@pytest.mark.parametrize("aligner", ["permutation", "cca"])
def test_tied_parameter_alias_outside_the_graph_is_merged_correctly(aligner):
    # used to load the untransformed alias last, silently undoing the alignment
    torch.manual_seed(0)
    a = _Tied()
    b = copy.deepcopy(a)
    perm = torch.randperm(8)
    with torch.no_grad():
        b.emb.weight.copy_(a.emb.weight[perm])
        b.emb.bias.copy_(a.emb.bias[perm])
        b.out.weight.copy_(a.out.weight[:, perm])
    x = _data()[0]
    merged = autoalign.merge([a, b], _data(), aligner=aligner)
    assert merged.alias.weight is merged.emb.weight
    torch.testing.assert_close(merged(x), a(x), atol=1e-5, rtol=1e-5)


def test_models_in_train_mode_are_restored_and_statistics_use_eval_mode():
    models = [_mlp(s, bn=True, dropout=True) for s in range(2)]
    for m in models:
        m.train()
    before = [_state(m) for m in models]
    evals = [copy.deepcopy(m).eval() for m in models]
    merged = autoalign.merge(models, _data(), aligner="cca")
    for m, sd in zip(models, before):
        assert m.training and all(sub.training for sub in m.modules())
        _assert_same_state(sd, m.state_dict())  # BatchNorm running stats not updated by the passes
    assert merged.training
    # dropout off and BatchNorm in eval mode during statistics: same result as eval-mode inputs
    merged_eval = autoalign.merge(evals, _data(), aligner="cca")
    _assert_same_state(merged.state_dict(), merged_eval.state_dict())


def test_batchnorm_num_batches_tracked_buffer():
    models = [_mlp(s, bn=True) for s in range(2)]
    for m in models:
        m[1].num_batches_tracked.fill_(7 + int(m[0].weight[0, 0] > 0))
    merged = autoalign.merge(models, _data(n=3), aligner="cca")
    nbt = merged.state_dict()["1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and int(nbt) == 3  # re-estimated on the 3 calibration batches
    merged = autoalign.merge(models, _data(n=3), aligner="permutation", repair=None)
    assert merged.state_dict()["1.num_batches_tracked"].dtype == torch.int64
    assert _finite(merged)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aligner", ["cca", "permutation"])
def test_half_precision_models_keep_their_dtype_with_float64_statistics(dtype, aligner):
    models = [_mlp(s, bn=True).to(dtype) for s in range(2)]
    data = [x.to(dtype) for x in _data()]
    res = autoalign.merge_with_report(models, data, aligner=aligner)
    for k, v in res.model.state_dict().items():
        assert v.dtype == models[0].state_dict()[k].dtype, k
    assert _finite(res.model)
    for ps in res.stats.points.values():
        assert all(s.dtype == torch.float64 for s in ps.sums + ps.squares)
    # statistics match those of float32 copies of the same models fed the same (rounded) data
    ref = autoalign.merge_with_report([m.float() for m in copy.deepcopy(models)], [x.float() for x in data], aligner=aligner)
    for name, ps in res.stats.points.items():
        torch.testing.assert_close(ps.cov(0, 1), ref.stats[name].cov(0, 1), atol=0.05, rtol=0.05)


def test_float32_data_for_a_float16_model_names_the_dtype():
    models = [_mlp(s).half() for s in range(2)]
    with pytest.raises(DataError, match=r"the model is torch.float16 but the batch holds \['torch.float32'\].*input_fn="):
        autoalign.merge(models, _data())


# --- data ------------------------------------------------------------------------------


def test_empty_list_of_batches():
    with pytest.raises(DataError, match="yielded no batch"):
        autoalign.merge([_mlp(0), _mlp(1)], [])


def test_empty_dataloader():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(0, 4)), batch_size=4)
    with pytest.raises(DataError, match="yielded no batch"):
        autoalign.merge([_mlp(0), _mlp(1)], loader)


def test_one_shot_iterator():
    with pytest.raises(MergeError, match="re-iterable"):
        autoalign.merge([_mlp(0), _mlp(1)], iter(_data()))


def test_first_batch_the_models_cannot_consume():
    # a data error, not a tracing error with a ShapeProp traceback
    with pytest.raises(DataError, match=r"calibration batch 0 cannot be fed to the model.*shape=\(2, 5\).*input_fn="):
        autoalign.merge([_mlp(0), _mlp(1)], _data(d_in=5))


def test_later_batch_the_models_cannot_consume():
    data = _data() + _data(n=1, d_in=5)
    with pytest.raises(DataError, match=r"calibration batch 3 cannot be fed to model 0 .*shape=\(32, 5\).*input_fn="):
        autoalign.merge([_mlp(0), _mlp(1)], data)


def test_batch_dict_without_an_input_key():
    with pytest.raises(DataError, match=r"keys \['foo'\]; pass input_fn="):
        autoalign.merge([_mlp(0), _mlp(1)], [{"foo": x} for x in _data()])


def test_nan_activations_name_the_merge_point():
    data = _data()
    data[1][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN/Inf features at merge point '0' .*calibration batch 1"):
        autoalign.merge([_mlp(0), _mlp(1)], data)


def test_inf_activations_from_float16_overflow_name_the_merge_point():
    models = [_mlp(s).half() for s in range(2)]
    data = [x.half() * 6e4 for x in _data()]
    with pytest.raises(NonFiniteError, match=r"merge point '0'.*float16"):
        autoalign.merge(models, data)


def test_fewer_samples_than_features_warns():
    with pytest.warns(UserWarning, match=r"fewer samples than features.*'0', 4 samples for 16 features"):
        merged = autoalign.merge([_mlp(0, hidden=16), _mlp(1, hidden=16)], [torch.randn(4, 4)], aligner="cca")
    assert _finite(merged)


def test_calibration_batches_sorted_by_class_are_reordered_with_a_warning():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 4, generator=g), torch.arange(128) // 32  # four classes, class by class
    with pytest.warns(UserWarning, match=r"reset_bn: the calibration batches are sorted by class \(8 batches\).*estimated again"):
        merged = autoalign.merge([_mlp(0, bn=True), _mlp(1, bn=True)], [(x[i : i + 16], y[i : i + 16]) for i in range(0, 128, 16)])
    assert int(merged[1].num_batches_tracked) == 8 and _finite(merged)


# --- options ---------------------------------------------------------------------------


def test_unknown_aligner_option_names_it_and_lists_the_valid_ones():
    with pytest.raises(OptionError, match=r"no option 'ridg' \(did you mean 'ridge'\?\); valid options: ridge, ridge_mode"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner="cca", ridg=0.1)
    with pytest.raises(TypeError):  # what older versions raised
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner="cca", ridg=0.1)


def test_option_for_an_aligner_without_options():
    with pytest.raises(OptionError, match=r"aligner 'identity' has no option 'ridge'; valid options: none"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner="identity", ridge=0.1)


def test_misspelled_merge_argument_is_pointed_out():
    with pytest.raises(OptionError, match=r"'num_batch' \(did you mean merge\(\)'s argument 'num_batches'\?\)"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), num_batch=2)


def test_invalid_option_value():
    with pytest.raises(OptionError, match=r"aligner 'cca': ridge must be >= 0, got -1"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner="cca", ridge=-1)


def test_unknown_aligner_name():
    with pytest.raises(OptionError, match=r"unknown aligner 'ccca'.*Did you mean 'cca'"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner="ccca")


def test_options_with_an_aligner_instance():
    with pytest.raises(OptionError, match=r"cannot be given together with an aligner instance"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), aligner=autoalign.get_aligner("cca"), ridge=0.1)


@pytest.mark.parametrize(
    "weights, match",
    [([1.0], "1 entries for 2 models"), ([1.0, float("nan")], "finite"), ([1.0, -1.0], "non-negative"), ([0.0, 0.0], "positive sum")],
)
def test_bad_weights(weights, match):
    with pytest.raises(OptionError, match=match):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), weights=weights)


@pytest.mark.parametrize("num_batches", [0, -1, 1.5])
def test_bad_num_batches(num_batches):
    with pytest.raises(OptionError, match="num_batches must be a positive int"):
        autoalign.merge([_mlp(0), _mlp(1)], _data(), num_batches=num_batches)


# --- numerical robustness --------------------------------------------------------------


def _degenerate(kind: str, seed: int) -> nn.Module:
    m = _mlp(seed, hidden=12)
    with torch.no_grad():
        if kind == "dead":  # half the ReLU units never fire
            m[0].weight[:6] = 0
            m[0].bias[:6] = -1
        elif kind == "duplicated":  # every unit twice
            m[0].weight[1::2] = m[0].weight[0::2]
            m[0].bias[1::2] = m[0].bias[0::2]
    return m


@pytest.mark.parametrize("kind", ["dead", "duplicated", "few_samples"])
def test_rank_deficient_covariances_never_give_nan(kind):
    data = [torch.randn(5, 4)] if kind == "few_samples" else _data()
    models = [_degenerate(kind, s) for s in range(3)]
    runs = [(name, {}) for name in autoalign.list_aligners()] + [("cca", {"ridge": 0.0}), ("mcca", {"ridge": 0.0})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, opts in runs:
            merged = autoalign.merge(models, data, aligner=name, **opts)
            assert _finite(merged), (name, opts)


# --- determinism -----------------------------------------------------------------------


@pytest.mark.parametrize("aligner", autoalign.list_aligners())
def test_merge_is_bitwise_deterministic(aligner):
    models = [_mlp(s, bn=True) for s in range(3)]
    data = _data()
    a = autoalign.merge(models, data, aligner=aligner).state_dict()
    torch.rand(17)  # the global random state does not matter
    b = autoalign.merge(models, data, aligner=aligner).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), (aligner, k)


def test_a_calibration_and_a_clashing_option_are_refused():
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)) for _ in range(2)]
    calib = autoalign.Calibration([torch.randn(8, 4) for _ in range(3)], num_batches=2)
    with pytest.raises(OptionError, match="sets num_batches itself"):
        autoalign.merge(nets, calib, aligner="permutation", num_batches=3)
    merged = autoalign.merge_with_report(nets, calib, aligner="permutation", num_batches=2)  # the same: fine
    assert merged.stats.batches == 2
