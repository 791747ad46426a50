import torch

from fixmatch.data.batches import IndexStream


def test_each_pass_visits_every_index_once():
    pool = list(range(100, 130))
    s = IndexStream(pool, batch_size=10, seed=0, stream_id=0)
    first_pass = torch.cat([s.batch(k) for k in range(3)])
    assert sorted(first_pass.tolist()) == pool


def test_batches_larger_than_pool_span_passes():
    s = IndexStream(list(range(40)), batch_size=64, seed=1, stream_id=0)
    b = s.batch(0)
    assert b.numel() == 64
    counts = torch.bincount(b, minlength=40)
    assert counts.min() >= 1 and counts.max() <= 2


def test_stream_is_a_pure_function_of_seed_and_step():
    a = IndexStream(list(range(50)), 7, seed=3, stream_id=1)
    b = IndexStream(list(range(50)), 7, seed=3, stream_id=1)
    seq_a = [a.batch(k) for k in range(20)]
    assert torch.equal(b.batch(13), seq_a[13])  # jump straight to a later step, as a resume does
    assert all(torch.equal(x, y) for x, y in zip(seq_a, [b.batch(k) for k in range(20)]))
    c = IndexStream(list(range(50)), 7, seed=4, stream_id=1)
    assert not torch.equal(c.batch(0), seq_a[0])
