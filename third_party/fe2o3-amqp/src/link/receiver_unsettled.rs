//! KEEL PATCH: a receiving link's unsettled deliveries, one entry per delivery.
//!
//! AMQP 1.0 §2.6.12 makes a delivery-tag unique among a link's unsettled deliveries, but
//! Qpid Proton C++ reuses tags (its counter restarts per sender handle). Keyed by tag alone,
//! a reused tag overwrote the earlier delivery's entry, and since an outcome is sent only for
//! a delivery found in the map, one of the two never got its outcome and its producer waited
//! for ever. Entries stay keyed by tag (attach's unsettled map and resumption name deliveries
//! by tag), and each delivery under a tag is told apart by its delivery-id, which is what
//! dispositions carry anyway.

use fe2o3_amqp_types::{
    definitions::{DeliveryNumber, DeliveryTag},
    messaging::DeliveryState,
    primitives::OrderedMap,
};

use crate::util::AsDeliveryState;

/// The unsettled deliveries that carry one tag at a receiver.
#[derive(Debug, Clone)]
pub struct TagDeliveries {
    /// The tag's first unsettled delivery. `None` as id: not known (a state that arrived
    /// before any delivery-id), which matches any id.
    id: Option<DeliveryNumber>,
    state: Option<DeliveryState>,
    /// Later deliveries that reused the tag while the first was unsettled; empty (and
    /// allocation-free) for a peer that keeps tags unique.
    reused: Vec<(DeliveryNumber, Option<DeliveryState>)>,
}

impl TagDeliveries {
    pub fn new(id: Option<DeliveryNumber>, state: Option<DeliveryState>) -> Self {
        Self {
            id,
            state,
            reused: Vec::new(),
        }
    }

    fn first_is(&self, id: Option<DeliveryNumber>) -> bool {
        match (id, self.id) {
            (None, _) | (_, None) => true,
            (Some(asked), Some(own)) => asked == own,
        }
    }

    fn state_mut(&mut self, id: Option<DeliveryNumber>) -> Option<&mut Option<DeliveryState>> {
        if self.first_is(id) {
            return Some(&mut self.state);
        }
        let id = id?;
        self.reused
            .iter_mut()
            .find(|(own, _)| *own == id)
            .map(|(_, state)| state)
    }
}

impl AsDeliveryState for TagDeliveries {
    /// The first delivery's state: what attach's unsettled map and resumption see (a tag
    /// that is reused is ambiguous there whatever is shown).
    fn as_delivery_state(&self) -> &Option<DeliveryState> {
        &self.state
    }
}

pub type ReceiverUnsettledMap = OrderedMap<DeliveryTag, TagDeliveries>;

/// Whether delivery `id` under `tag` is unsettled (`id` `None`: any delivery with the tag).
pub fn contains(
    map: &ReceiverUnsettledMap,
    tag: &DeliveryTag,
    id: Option<DeliveryNumber>,
) -> bool {
    map.get(tag).is_some_and(|entry| {
        entry.first_is(id) || id.is_some_and(|id| entry.reused.iter().any(|(own, _)| *own == id))
    })
}

/// The state of delivery `id` under `tag` (`id` `None`: the tag's first delivery).
pub fn state_mut<'a>(
    map: &'a mut ReceiverUnsettledMap,
    tag: &DeliveryTag,
    id: Option<DeliveryNumber>,
) -> Option<&'a mut Option<DeliveryState>> {
    map.get_mut(tag).and_then(|entry| entry.state_mut(id))
}

/// Set the state of delivery `id` under `tag`, adding its entry when it has none: a delivery
/// that reuses the tag of an unsettled one gets an entry of its own. `rebind`: the delivery
/// is a resumed one (§2.6.13), which takes over the tag's first entry under its new
/// delivery-id. Returns the previous state when the delivery had an entry.
pub fn upsert(
    map: &mut ReceiverUnsettledMap,
    tag: &DeliveryTag,
    id: Option<DeliveryNumber>,
    state: Option<DeliveryState>,
    rebind: bool,
) -> Option<Option<DeliveryState>> {
    let Some(entry) = map.get_mut(tag) else {
        let _ = map.insert(tag.clone(), TagDeliveries::new(id, state));
        return None;
    };
    if rebind {
        entry.id = id;
        return Some(std::mem::replace(&mut entry.state, state));
    }
    if let Some(own) = entry.state_mut(id) {
        return Some(std::mem::replace(own, state));
    }
    // `state_mut` matches every delivery when `id` is None, so `id` is known here.
    let id = id.expect("an unmatched delivery has an id");
    entry.reused.push((id, state));
    None
}

/// Forget delivery `id` under `tag` (settled); returns its state when it had an entry. The
/// tag's entry goes when its last delivery does.
pub fn remove(
    map: &mut ReceiverUnsettledMap,
    tag: &DeliveryTag,
    id: Option<DeliveryNumber>,
) -> Option<Option<DeliveryState>> {
    let entry = map.get_mut(tag)?;
    if entry.first_is(id) {
        if entry.reused.is_empty() {
            return map.swap_remove(tag).map(|entry| entry.state);
        }
        // The next delivery with this tag becomes the first.
        let (next_id, next_state) = entry.reused.remove(0);
        entry.id = Some(next_id);
        return Some(std::mem::replace(&mut entry.state, next_state));
    }
    let id = id?;
    let at = entry.reused.iter().position(|(own, _)| *own == id)?;
    Some(entry.reused.remove(at).1)
}
