//! What the paged-attention kernel needs to know about a batch, flattened into the plain
//! arrays it reads: which packed rows are short-run queries, how much context each sees, and
//! where its sequence's block table starts in one concatenated table array.

use crate::kv_cache::SequenceSlice;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PagedQueries {
    /// The block tables of the included sequences, concatenated.
    pub block_tables: Vec<u32>,
    /// Per query: its row in the packed batch.
    pub query_rows: Vec<u32>,
    /// Per query: how many positions it attends to (its own included).
    pub context_lens: Vec<u32>,
    /// Per query: index in `block_tables` where its sequence's table starts.
    pub table_starts: Vec<u32>,
    /// The longest context, which sizes the kernel's shared memory.
    pub max_context: usize,
}

impl PagedQueries {
    /// The queries of every slice of at most `max_run` new tokens, in packed order.
    pub fn new(slices: &[SequenceSlice], max_run: usize) -> Self {
        let mut plan = Self::default();
        let mut row = 0u32;
        for slice in slices {
            if slice.len <= max_run {
                let start = plan.block_tables.len() as u32;
                plan.block_tables.extend_from_slice(&slice.block_table);
                for i in 0..slice.len {
                    let context = slice.start + i + 1;
                    plan.query_rows.push(row + i as u32);
                    plan.context_lens.push(context as u32);
                    plan.table_starts.push(start);
                    plan.max_context = plan.max_context.max(context);
                }
            }
            row += slice.len as u32;
        }
        plan
    }

    pub fn is_empty(&self) -> bool {
        self.query_rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(start: usize, len: usize, block_table: Vec<u32>) -> SequenceSlice {
        SequenceSlice {
            start,
            len,
            block_table,
            wants_logits: true,
        }
    }

    /// Short runs are listed with their packed rows and contexts; a long prefill between them
    /// is skipped but still shifts the rows after it.
    #[test]
    fn lists_short_runs_in_packed_order() {
        let slices = [
            slice(9, 1, vec![4, 7]),
            slice(0, 20, vec![1, 2]),
            slice(3, 2, vec![5]),
        ];
        let plan = PagedQueries::new(&slices, 16);
        assert_eq!(plan.query_rows, [0, 21, 22]);
        assert_eq!(plan.context_lens, [10, 4, 5]);
        assert_eq!(plan.block_tables, [4, 7, 5]);
        assert_eq!(plan.table_starts, [0, 2, 2]);
        assert_eq!(plan.max_context, 10);
        assert!(PagedQueries::new(&slices[1..2], 16).is_empty());
    }
}
