import math

import pytest
import torch
import torch.nn.functional as F

from qtool.errors import QtoolError
from qtool.runtime.perplexity import perplexity, split_windows


def test_windows_do_not_overlap_and_drop_the_partial_tail():
    windows = split_windows(torch.arange(10), 3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert split_windows(torch.arange(10), 3, max_windows=2).shape == (2, 3)
    with pytest.raises(QtoolError, match="fewer than one window"):
        split_windows(torch.arange(2), 3)


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_llama):
    windows = torch.randint(0, 300, (3, 17))
    result = perplexity(tiny_llama, windows)
    with torch.no_grad():
        logits = tiny_llama(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert (result.windows, result.tokens, result.seqlen) == (3, 51, 17)


def test_a_model_compared_with_itself_agrees_fully(tiny_llama):
    windows = torch.randint(0, 300, (2, 16))
    result = perplexity(tiny_llama, windows, base=tiny_llama)
    assert result.base_ppl == pytest.approx(result.ppl)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agree == 1.0


def test_kl_and_agreement_see_a_changed_model(tiny_llama):
    import copy

    changed = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for parameter in changed.model.layers[0].parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    result = perplexity(changed, torch.randint(0, 300, (2, 32)), base=tiny_llama)
    assert result.kl > 1e-3
    assert result.top1_agree < 1.0
