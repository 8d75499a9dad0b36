//! The handle table as it was before resolution became lock-free (a `Vec` of slots under a
//! `RwLock`), kept as the reference that `tests::proptest_against_the_locked_table` compares the
//! lock-free table with: same handles, same errors, same live counts.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::{jlong, HandleError, GENERATION_SHIFT, INDEX_MASK, MAX_SLOTS, TAG_SHIFT};

struct Slot<T> {
    generation: u32,
    value: Option<Arc<T>>,
}

struct Slots<T> {
    slots: Vec<Slot<T>>,
    free: VecDeque<u32>,
    live: usize,
}

pub(crate) struct LockedTable<T> {
    tag: u8,
    kind: &'static str,
    inner: RwLock<Slots<T>>,
}

impl<T> LockedTable<T> {
    pub(crate) fn new(tag: u8, kind: &'static str) -> Self {
        LockedTable {
            tag,
            kind,
            inner: RwLock::new(Slots {
                slots: Vec::new(),
                free: VecDeque::new(),
                live: 0,
            }),
        }
    }

    pub(crate) fn live(&self) -> usize {
        self.inner.read().live
    }

    fn encode(&self, index: u32, generation: u32) -> jlong {
        ((u64::from(self.tag) << TAG_SHIFT)
            | (u64::from(generation) << GENERATION_SHIFT)
            | u64::from(index)) as jlong
    }

    fn decode(&self, handle: jlong) -> Result<(usize, u32), HandleError> {
        if handle == 0 {
            return Err(HandleError::Null { kind: self.kind });
        }
        let raw = handle as u64;
        if raw >> TAG_SHIFT != u64::from(self.tag) {
            return Err(HandleError::WrongKind {
                handle,
                kind: self.kind,
            });
        }
        let generation = ((raw >> GENERATION_SHIFT) & u64::from(u32::MAX)) as u32;
        Ok(((raw & INDEX_MASK) as usize, generation))
    }

    pub(crate) fn insert(&self, value: Arc<T>) -> Result<jlong, HandleError> {
        let mut t = self.inner.write();
        let index = match t.free.pop_front() {
            Some(i) => i as usize,
            None => {
                if t.slots.len() >= MAX_SLOTS {
                    return Err(HandleError::Full { kind: self.kind });
                }
                t.slots.push(Slot {
                    generation: 1,
                    value: None,
                });
                t.slots.len() - 1
            }
        };
        let slot = &mut t.slots[index];
        slot.value = Some(value);
        let generation = slot.generation;
        t.live += 1;
        Ok(self.encode(index as u32, generation))
    }

    pub(crate) fn get(&self, handle: jlong) -> Result<Arc<T>, HandleError> {
        let (index, generation) = self.decode(handle)?;
        let t = self.inner.read();
        let slot = t.slots.get(index).ok_or(HandleError::Unknown {
            handle,
            kind: self.kind,
        })?;
        match &slot.value {
            Some(v) if slot.generation == generation => Ok(v.clone()),
            _ => Err(self.mismatch(handle, slot.generation, generation)),
        }
    }

    pub(crate) fn remove(&self, handle: jlong) -> Result<Arc<T>, HandleError> {
        let (index, generation) = self.decode(handle)?;
        let mut t = self.inner.write();
        let slot = t.slots.get_mut(index).ok_or(HandleError::Unknown {
            handle,
            kind: self.kind,
        })?;
        let current = slot.generation;
        let value = match slot.value.take() {
            Some(v) if current == generation => v,
            other => {
                slot.value = other;
                return Err(self.mismatch(handle, current, generation));
            }
        };
        slot.generation = current.checked_add(1).unwrap_or(1);
        t.free.push_back(index as u32);
        t.live -= 1;
        Ok(value)
    }

    fn mismatch(&self, handle: jlong, current: u32, asked: u32) -> HandleError {
        if asked != 0 && asked < current {
            HandleError::Stale {
                handle,
                kind: self.kind,
            }
        } else {
            HandleError::Unknown {
                handle,
                kind: self.kind,
            }
        }
    }
}
