"""The block manager on its own: reference counts, prefix caching by chained hashes, LRU reuse of freed blocks."""

from shardgen.actors.engine.blocks import BlockManager, chain_hash
from shardgen.actors.engine.sequence import Request, SamplingParams, Sequence


def seq(tokens: list[int], **params) -> Sequence:
    return Sequence(Request("r", tokens, SamplingParams(**params)))


def computed(blocks: BlockManager, s: Sequence) -> Sequence:
    """Give ``s`` the blocks of all its tokens and count them computed, as a finished prefill leaves it."""
    blocks.allocate(s, blocks.blocks_needed(s, len(s.tokens)))
    s.num_computed = len(s.tokens)
    blocks.register(s)
    return s


def test_a_hash_names_the_whole_prefix_not_just_the_block():
    first = chain_hash(b"", [1, 2, 3, 4])
    assert chain_hash(first, [5, 6, 7, 8]) != chain_hash(chain_hash(b"", [9, 9, 9, 9]), [5, 6, 7, 8])
    assert chain_hash(b"", [1, 2, 3, 4]) == first


def test_a_shared_prefix_attaches_the_same_blocks_and_counts_references():
    blocks = BlockManager(16, 4, prefix_caching=True)
    a = computed(blocks, seq(list(range(1, 11))))  # 10 tokens: blocks 0-1 full, block 2 partial
    b = seq(list(range(1, 9)) + [50, 51, 52])
    assert blocks.attach_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [blocks.refs[x] for x in a.block_table] == [2, 2, 1]


def test_the_block_of_the_last_token_is_never_attached():
    """An identical prompt still computes its last block: the last token is needed to sample from."""
    blocks = BlockManager(16, 4, prefix_caching=True)
    computed(blocks, seq(list(range(1, 9))))  # exactly two full blocks
    again = seq(list(range(1, 9)))
    assert blocks.attach_prefix(again) == 4


def test_freed_blocks_keep_their_contents_and_go_out_again_never_used_first_then_a_prefix_tail_before_its_head():
    blocks = BlockManager(4, 4, prefix_caching=True)
    a = computed(blocks, seq(list(range(1, 9))))  # blocks 0, 1
    blocks.release(a)
    assert blocks.num_free == 4 and len(blocks.cached) == 2  # free, and still cached
    other = seq([90] * 8)
    blocks.allocate(other, 2)
    assert set(other.block_table) == {2, 3} and len(blocks.cached) == 2  # never-used blocks first
    tail = seq([91] * 4)
    blocks.allocate(tail, 1)
    assert tail.block_table == [1]  # the prefix's second block goes before its first
    assert blocks.attach_prefix(seq(list(range(1, 9)) + [5])) == 4


def test_reusing_a_cached_block_for_other_tokens_forgets_its_prefix():
    blocks = BlockManager(2, 4, prefix_caching=True)
    a = computed(blocks, seq(list(range(1, 9))))
    blocks.release(a)
    blocks.allocate(seq([70] * 8), 2)
    assert not blocks.cached
    assert blocks.attach_prefix(seq(list(range(1, 10)))) == 0


def test_rows_that_ask_for_prompt_logprobs_compute_their_whole_prompt():
    blocks = BlockManager(16, 4, prefix_caching=True)
    computed(blocks, seq(list(range(1, 13))))
    assert blocks.attach_prefix(seq(list(range(1, 13)), prompt_logprobs=True)) == 0


def test_with_prefix_caching_off_nothing_is_registered_or_attached():
    blocks = BlockManager(16, 4, prefix_caching=False)
    computed(blocks, seq(list(range(1, 13))))
    assert not blocks.cached and blocks.attach_prefix(seq(list(range(1, 13)))) == 0
