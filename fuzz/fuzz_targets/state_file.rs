//! The agent's state files: the envelope (`state::decode`: magic, kind, version, length, CRC-32)
//! on untrusted bytes, and, inside a valid envelope, each kind's payload decoder: the history,
//! the forecasters (restored, then fed a sample), the journal of original cgroup values and the
//! record of resized pods. The first byte picks the kind. Never a panic; a refusal says why.
#![no_main]

use headroom_agent::act::{self, resize};
use headroom_agent::config::ForecastSettings;
use headroom_agent::forecast::Forecasts;
use headroom_agent::history::History;
use headroom_agent::state::{self, Kind};
use libfuzzer_sys::fuzz_target;

const KINDS: [Kind; 4] = [
    state::HISTORY,
    state::FORECASTS,
    act::ORIGINALS,
    resize::RESIZES,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(pick) % KINDS.len()];
    if let Err(why) = state::decode(kind, data) {
        assert!(!why.is_empty());
    }
    // The checksum keeps mutated payloads out of the envelope, so wrap them to reach the
    // decoder behind it.
    let file = state::envelope(kind, payload);
    assert_eq!(
        state::decode(kind, &file),
        Ok(payload),
        "envelope round trip"
    );
    match usize::from(pick) % KINDS.len() {
        0 => {
            if let Err(e) = History::new(1000, 32, 60, 16).decode_into(payload) {
                assert!(!e.to_string().is_empty());
            }
        }
        1 => forecasts(payload),
        2 => {
            if let Err(e) = act::decode_originals(payload) {
                assert!(!e.to_string().is_empty());
            }
        }
        _ => {
            if let Err(e) = resize::decode_journal(payload) {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});

/// Restores forecasters as a restarting agent does, then feeds every restored series a sample,
/// so a restored state that breaks a forecaster's invariants shows here and not on a node.
fn forecasts(payload: &[u8]) {
    let settings = ForecastSettings::default();
    let mut f = Forecasts::new(&settings, 1.0).expect("default settings are valid");
    match f.restore(payload) {
        Ok(n) => {
            assert!(f.len() <= n, "restored {} of {n}", f.len());
            let points: Vec<_> = f.keys().map(|k| (k.clone(), 1.0)).collect();
            for _ in 0..12 {
                f.observe(&points);
            }
            let saved = f.encode();
            let mut again = Forecasts::new(&settings, 1.0).expect("default settings are valid");
            again
                .restore(&saved)
                .expect("the agent's own state restores");
        }
        Err(why) => assert!(!why.is_empty()),
    }
}
