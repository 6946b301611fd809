"""Testing support: the pytest plugin and helpers for test bodies that run on several ranks.

The plugin (``distruntime.testing.plugin``) is registered through the ``pytest11``
entry point. :func:`assert_all_ranks` is a collective assertion: every rank fails it
when any rank's condition is false, and the message names those ranks.

Example::

    from distruntime.testing import assert_all_ranks

    @pytest.mark.distributed(world_size=2)
    def test_loss_is_finite(dist_info):
        loss = train_step()
        assert_all_ranks(torch.isfinite(loss), f"loss={loss.item()}")
"""

from distruntime.testing.helpers import assert_all_ranks

__all__ = ["assert_all_ranks"]
