#!/usr/bin/env bash
# cargo deny check (deny.toml): licences, duplicate versions and sources, then advisories.
#
# Advisories need the RustSec advisory database. cargo-deny fetches it itself where its host is
# reachable. A machine that reaches only package registries cannot, so HEADROOM_ADVISORY_DB may
# name a local git copy of that database (its `main` branch), used without fetching; failing
# both, the copy an earlier run left is used, with its date. With none, advisories cannot be
# checked: the script says so on a SKIP line, and fails when HEADROOM_REQUIRE_ADVISORIES=1.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo deny --locked check bans licenses sources

# Where cargo-deny keeps the default database (tame-index names the folder after the URL).
db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-3157b0e258782691"
if [ -n "${HEADROOM_ADVISORY_DB:-}" ]; then
  [ -d "$HEADROOM_ADVISORY_DB/crates" ] ||
    { echo "deny: HEADROOM_ADVISORY_DB=$HEADROOM_ADVISORY_DB holds no advisory database (no crates/)" >&2; exit 1; }
  rm -rf "$db"
  mkdir -p "$(dirname "$db")"
  git clone -q --branch main "$HEADROOM_ADVISORY_DB" "$db"
  echo "deny: advisories from $HEADROOM_ADVISORY_DB ($(git -C "$db" log -1 --format='%h, %cs'))"
  cargo deny --offline check advisories
elif timeout 120 cargo deny fetch db >/dev/null 2>&1; then
  cargo deny --offline check advisories
elif [ -d "$db/crates" ]; then
  echo "deny: cannot fetch the advisory database; using the copy from $(git -C "$db" log -1 --format='%cs')"
  cargo deny --offline check advisories
else
  echo "SKIP cargo deny advisories: cannot fetch the advisory database from this machine; set HEADROOM_ADVISORY_DB to a local copy"
  [ "${HEADROOM_REQUIRE_ADVISORIES:-0}" != 1 ] || exit 1
fi
