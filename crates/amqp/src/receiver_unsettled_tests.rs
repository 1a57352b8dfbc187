//! KEEL PATCH proof (`third_party/fe2o3-amqp/src/link/receiver_unsettled.rs`): a receiving
//! link keeps one unsettled entry per delivery, so a delivery-tag a peer reuses among its
//! unsettled deliveries (Qpid Proton C++ does) leaves each delivery its own outcome. The end to
//! end proof is `crates/cli/tests/amqp.rs`, `reused_delivery_tags_each_get_their_outcome_*`.

use fe2o3_amqp::link::receiver_unsettled::{
    contains, remove, state_mut, upsert, ReceiverUnsettledMap,
};
use fe2o3_amqp::types::definitions::DeliveryTag;
use fe2o3_amqp::types::messaging::{Accepted, DeliveryState, Received};

fn received() -> Option<DeliveryState> {
    Some(DeliveryState::Received(Received {
        section_number: 0,
        section_offset: 0,
    }))
}

fn tag(t: &[u8]) -> DeliveryTag {
    DeliveryTag::from(t.to_vec())
}

#[test]
fn a_reused_tag_keeps_one_entry_per_delivery() {
    let mut map = ReceiverUnsettledMap::new();
    assert!(upsert(&mut map, &tag(b"t0"), Some(1), received(), false).is_none());
    assert!(upsert(&mut map, &tag(b"t0"), Some(8), received(), false).is_none());
    assert!(upsert(&mut map, &tag(b"t0"), Some(15), received(), false).is_none());
    assert_eq!(map.len(), 1, "keyed by tag");
    for id in [1, 8, 15] {
        assert!(contains(&map, &tag(b"t0"), Some(id)));
    }
    assert!(!contains(&map, &tag(b"t0"), Some(2)));

    // Settled in any order, each exactly once.
    assert!(remove(&mut map, &tag(b"t0"), Some(8)).is_some());
    assert!(remove(&mut map, &tag(b"t0"), Some(8)).is_none());
    assert!(remove(&mut map, &tag(b"t0"), Some(1)).is_some());
    assert!(contains(&map, &tag(b"t0"), Some(15)));
    assert!(!contains(&map, &tag(b"t0"), Some(1)));
    assert!(remove(&mut map, &tag(b"t0"), Some(15)).is_some());
    assert!(map.is_empty());
}

#[test]
fn frames_of_one_delivery_update_its_own_entry() {
    let mut map = ReceiverUnsettledMap::new();
    // A multi-frame delivery writes its entry once per frame.
    assert!(upsert(&mut map, &tag(b"t"), Some(3), received(), false).is_none());
    assert!(upsert(&mut map, &tag(b"t"), Some(3), received(), false).is_some());
    // Mode second: the receiver's non-settled outcome updates it.
    let accepted = Some(DeliveryState::Accepted(Accepted {}));
    assert!(upsert(&mut map, &tag(b"t"), Some(3), accepted.clone(), false).is_some());
    assert_eq!(map.len(), 1);
    assert_eq!(*state_mut(&mut map, &tag(b"t"), Some(3)).unwrap(), accepted);
}

#[test]
fn a_resumed_delivery_takes_over_the_first_entry() {
    let mut map = ReceiverUnsettledMap::new();
    assert!(upsert(&mut map, &tag(b"t"), Some(3), received(), false).is_none());
    // On the new session the delivery has a new id.
    assert!(upsert(&mut map, &tag(b"t"), Some(40), received(), true).is_some());
    assert!(contains(&map, &tag(b"t"), Some(40)));
    assert!(!contains(&map, &tag(b"t"), Some(3)));
    assert!(remove(&mut map, &tag(b"t"), Some(40)).is_some());
    assert!(map.is_empty());
}
