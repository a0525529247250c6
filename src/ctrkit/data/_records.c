/* Raw records -> encoded ids and raw numbers in one pass, for the scorer's hot path.
 *
 * The reference path (ctrkit.validate.records_frame -> coerce_chunk -> Encoder.transform_frame) builds a typed
 * polars frame of the records and encodes it: about 4 ms for a ranking request of 1000 candidates of 39 fields,
 * most of it creating and converting one Python object per value. This module reads the values straight out of
 * the record dicts and looks each categorical one up in a table of the vocabulary's bytes.
 *
 * It handles only the plain case and says so when a request is not plain (a value of another type, a missing
 * or unknown key, a non-finite number, a missing required value): the caller then takes the reference path,
 * which gives the same ids for plain values (tests/test_records_native.py checks it) and the errors naming the
 * record and field. The extension is optional: without a C compiler at install time the reference path serves.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------- hashing */

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_bytes(const char *p, Py_ssize_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL * (uint64_t)(n + 1);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = mix64(h ^ v);
        p += 8;
        n -= 8;
    }
    if (n > 0) {
        uint64_t v = 0;
        memcpy(&v, p, (size_t)n);
        h = mix64(h ^ v);
    }
    return mix64(h);
}

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[i] = c;
    }
}

/* CRC-32 (IEEE), equal to zlib.crc32 and to ctrkit.data.encode._crc32 */
static uint32_t crc32_bytes(const char *p, Py_ssize_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < n; i++) c = crc_table[(c ^ (uint8_t)p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---------------------------------------------------------------- VocabTable */

#define INLINE 11  /* key bytes held in a slot: most ids and codes fit, so a lookup reads one cache line */

/* A slot: its entry + 1 (0: empty), the key's length (255: 255 or more) and first INLINE bytes. */
typedef struct {
    uint32_t entry;
    uint8_t len;
    char key[INLINE];
} Slot;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;      /* entries */
    uint64_t mask;     /* slots - 1 */
    Slot *slots;
    int64_t *offsets;  /* n + 1, into data */
    char *data;
} VocabTable;

static void table_dealloc(VocabTable *t) {
    PyMem_Free(t->slots);
    PyMem_Free(t->offsets);
    PyMem_Free(t->data);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static inline int bytes_eq(const char *a, const char *b, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

/* The entry of the key s[0:len] whose hash is h, or -1. Most probes end at the first slot, read once. */
static Py_ssize_t table_find_hashed(const VocabTable *t, const char *s, Py_ssize_t len, uint64_t h) {
    uint8_t short_len = len < 255 ? (uint8_t)len : 255;
    Py_ssize_t head = len < INLINE ? len : INLINE;
    for (uint64_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const Slot *slot = &t->slots[i];
        if (slot->entry == 0) return -1;
        if (slot->len != short_len || !bytes_eq(slot->key, s, head)) continue;
        uint32_t e = slot->entry - 1;
        if (len <= INLINE
            || (t->offsets[e + 1] - t->offsets[e] == len && memcmp(t->data + t->offsets[e], s, (size_t)len) == 0))
            return (Py_ssize_t)e;
    }
}

static inline Py_ssize_t table_find(const VocabTable *t, const char *s, Py_ssize_t len) {
    return table_find_hashed(t, s, len, hash_bytes(s, len));
}

/* VocabTable(data, offsets): entry i is data[offsets[i]:offsets[i + 1]] (offsets: int64, n + 1 of them). */
static PyObject *table_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data", "offsets", NULL};
    Py_buffer data, offs;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*", kwlist, &data, &offs)) return NULL;
    VocabTable *t = NULL;
    if (offs.len % 8 != 0 || offs.len < 8) {
        PyErr_SetString(PyExc_ValueError, "offsets must hold n + 1 int64 values");
        goto done;
    }
    Py_ssize_t n = offs.len / 8 - 1;
    if (n >= 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "a vocabulary table holds fewer than 2^32 - 1 entries");
        goto done;
    }
    const int64_t *o = (const int64_t *)offs.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (o[i] < o[0] || o[i + 1] < o[i] || o[i + 1] > data.len) {
            PyErr_SetString(PyExc_ValueError, "offsets must rise within the data");
            goto done;
        }
    }
    t = (VocabTable *)type->tp_alloc(type, 0);
    if (t == NULL) goto done;
    uint64_t cap = 16;
    while (cap < 2 * (uint64_t)n) cap <<= 1;
    size_t bytes = (size_t)(o[n] - o[0]);
    t->n = n;
    t->mask = cap - 1;
    t->slots = PyMem_Calloc(cap, sizeof(Slot));
    t->offsets = PyMem_Malloc((size_t)(n + 1) * sizeof(int64_t));
    t->data = PyMem_Malloc(bytes ? bytes : 1);
    if (!t->slots || !t->offsets || !t->data) {
        Py_CLEAR(t);
        PyErr_NoMemory();
        goto done;
    }
    memcpy(t->data, (const char *)data.buf + o[0], bytes);
    for (Py_ssize_t i = 0; i <= n; i++) t->offsets[i] = o[i] - o[0];
    for (Py_ssize_t e = 0; e < n; e++) {
        const char *s = t->data + t->offsets[e];
        Py_ssize_t len = (Py_ssize_t)(t->offsets[e + 1] - t->offsets[e]);
        uint64_t h = hash_bytes(s, len), i = h & t->mask;
        if (table_find_hashed(t, s, len, h) >= 0) {
            PyErr_Format(PyExc_ValueError, "entry %zd repeats an earlier one", e);
            Py_CLEAR(t);
            goto done;
        }
        while (t->slots[i].entry != 0) i = (i + 1) & t->mask;
        t->slots[i].entry = (uint32_t)(e + 1);
        t->slots[i].len = len < 255 ? (uint8_t)len : 255;
        memcpy(t->slots[i].key, s, (size_t)(len < INLINE ? len : INLINE));
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&offs);
    return (PyObject *)t;
}

static Py_ssize_t table_len(VocabTable *t) { return t->n; }

/* find(text) -> the entry's index, or -1 */
static PyObject *table_find_py(VocabTable *t, PyObject *arg) {
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &len);
    if (s == NULL) return NULL;
    return PyLong_FromSsize_t(table_find(t, s, len));
}

static PyMethodDef table_methods[] = {
    {"find", (PyCFunction)table_find_py, METH_O, "The entry index of a text, or -1."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods table_as_sequence = {.sq_length = (lenfunc)table_len};

static PyTypeObject VocabTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ctrkit.data._records.VocabTable",
    .tp_doc = "A vocabulary's texts -> their index (0..n-1), looked up by bytes.",
    .tp_basicsize = sizeof(VocabTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_as_sequence = &table_as_sequence,
};

/* ---------------------------------------------------------------- Plan */

enum { VOCAB = 0, HASHED = 1, NUMBER = 2 };

typedef struct {
    PyObject *name;     /* str */
    int kind;
    Py_ssize_t col;     /* column of ids (VOCAB, HASHED) or of the raw numbers (NUMBER) */
    VocabTable *table;  /* VOCAB */
    int64_t offset;     /* the field's first id */
    int64_t buckets;    /* HASHED */
    int required;
} FieldPlan;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n_fields;
    FieldPlan *fields;
    Py_ssize_t n_ids, n_numbers;
} Plan;

static void plan_dealloc(Plan *p) {
    for (Py_ssize_t i = 0; i < p->n_fields; i++) {
        Py_XDECREF(p->fields[i].name);
        Py_XDECREF((PyObject *)p->fields[i].table);
    }
    PyMem_Free(p->fields);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* Plan(fields, n_ids, n_numbers): fields is a sequence of (name, kind, col, table, offset, buckets, required). */
static PyObject *plan_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fields", "n_ids", "n_numbers", NULL};
    PyObject *spec;
    Py_ssize_t n_ids, n_numbers;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onn", kwlist, &spec, &n_ids, &n_numbers)) return NULL;
    PyObject *seq = PySequence_Fast(spec, "fields must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(seq);
    Plan *p = (Plan *)type->tp_alloc(type, 0);
    if (p == NULL) goto fail;
    p->fields = PyMem_Calloc(nf ? (size_t)nf : 1, sizeof(FieldPlan));
    if (p->fields == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    p->n_ids = n_ids;
    p->n_numbers = n_numbers;
    for (Py_ssize_t i = 0; i < nf; i++) {
        FieldPlan *f = &p->fields[i];
        PyObject *name, *table;
        long long offset, buckets;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "UinOLLp;a field is (name, kind, col, table, "
                              "offset, buckets, required)", &name, &f->kind, &f->col, &table, &offset, &buckets,
                              &f->required))
            goto fail;
        p->n_fields = i + 1;
        Py_INCREF(name);
        f->name = name;
        PyUnicode_InternInPlace(&f->name);
        f->offset = offset;
        f->buckets = buckets;
        Py_ssize_t width = f->kind == NUMBER ? n_numbers : n_ids;
        if (f->kind < VOCAB || f->kind > NUMBER || f->col < 0 || f->col >= width) {
            PyErr_Format(PyExc_ValueError, "field %R: bad kind or column", name);
            goto fail;
        }
        if (f->kind == VOCAB) {
            if (!PyObject_TypeCheck(table, &VocabTableType)) {
                PyErr_Format(PyExc_TypeError, "field %R: a vocabulary field needs a VocabTable", name);
                goto fail;
            }
            Py_INCREF(table);
            f->table = (VocabTable *)table;
        }
        if (f->kind == HASHED && f->buckets < 1) {
            PyErr_Format(PyExc_ValueError, "field %R: a hashed field needs buckets >= 1", name);
            goto fail;
        }
    }
    Py_DECREF(seq);
    return (PyObject *)p;
fail:
    Py_DECREF(seq);
    Py_XDECREF(p);
    return NULL;
}

/* outcome of reading one value: ok, the missing value, or not plain (the caller takes the reference path) */
enum { OK = 0, MISSING = 1, NOT_PLAIN = 2, FAILED = 3 };

/* a vocabulary lookup waiting for its slot to arrive in the cache */
typedef struct {
    const FieldPlan *f;
    Py_ssize_t r, len;
    const char *s;
    uint64_t h;
} Lookup;

/* where encoded values go: ids [rows, n_ids] (int32 or int64) and raw numbers [rows, n_numbers] (float64); with
 * ``pending`` (room for one lookup per field), a record's vocabulary lookups are prefetched together and
 * resolved by flush(), so their cache misses overlap instead of following one another */
typedef struct {
    int wide;
    void *ids;
    Py_ssize_t n_ids;
    double *nums;
    Py_ssize_t n_numbers;
    Lookup *pending;
    Py_ssize_t n_pending;
} Out;

static inline void put_id(Out *o, Py_ssize_t r, Py_ssize_t col, int64_t id) {
    if (o->wide)
        ((int64_t *)o->ids)[r * o->n_ids + col] = id;
    else
        ((int32_t *)o->ids)[r * o->n_ids + col] = (int32_t)id;
}

static inline int64_t vocab_id(const FieldPlan *f, Py_ssize_t e) {
    return f->offset + (e >= 0 ? 2 + e : 1);  /* 1: out of vocabulary */
}

/* the pending lookups, resolved */
static void flush(Out *o) {
    for (Py_ssize_t i = 0; i < o->n_pending; i++) {
        const Lookup *k = &o->pending[i];
        put_id(o, k->r, k->f->col, vocab_id(k->f, table_find_hashed(k->f->table, k->s, k->len, k->h)));
    }
    o->n_pending = 0;
}

/* a categorical field's text (UTF-8 bytes; "" is missing) -> its id; ``stable``: s outlives the record (the
 * lookup may wait for flush) */
static void put_text(const FieldPlan *f, Out *o, Py_ssize_t r, const char *s, Py_ssize_t len, int stable) {
    int64_t id;
    if (len == 0) {
        id = f->offset;  /* the field's missing id, 0 */
    } else if (f->kind == VOCAB && stable && o->pending != NULL) {
        uint64_t h = hash_bytes(s, len);
        __builtin_prefetch(&f->table->slots[h & f->table->mask]);
        o->pending[o->n_pending++] = (Lookup){f, r, len, s, h};
        return;
    } else if (f->kind == VOCAB) {
        id = vocab_id(f, table_find(f->table, s, len));
    } else {
        id = f->offset + 1 + (int64_t)(crc32_bytes(s, len) % (uint64_t)f->buckets);
    }
    put_id(o, r, f->col, id);
}

/* a missing value (None, null): NaN or the missing id; in a required field it is the reference path's error */
static int put_missing(const FieldPlan *f, Out *o, Py_ssize_t r) {
    if (f->required) return NOT_PLAIN;
    if (f->kind == NUMBER)
        o->nums[r * o->n_numbers + f->col] = NAN;
    else
        put_id(o, r, f->col, f->offset);
    return OK;
}

/* An int within int64 as a file would hold it (decimal), or as a float. */
static int long_value(PyObject *v, long long *x) {
    int overflow;
    *x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) return NOT_PLAIN;
    if (*x == -1 && PyErr_Occurred()) return FAILED;
    return OK;
}

/* A Python value: categories str, int or None; numbers finite float, int or None. */
static int put_object(const FieldPlan *f, Out *o, Py_ssize_t r, PyObject *v) {
    if (v == Py_None) return put_missing(f, o, r);
    long long x;
    if (f->kind == NUMBER) {
        double d;
        if (PyFloat_CheckExact(v)) {
            d = PyFloat_AS_DOUBLE(v);
            if (!isfinite(d)) return NOT_PLAIN;
        } else if (PyLong_CheckExact(v)) {
            int got = long_value(v, &x);
            if (got != OK) return got;
            d = (double)x;
        } else {
            return NOT_PLAIN;
        }
        o->nums[r * o->n_numbers + f->col] = d;
        return OK;
    }
    if (PyUnicode_CheckExact(v)) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(v, &len);
        if (s == NULL) {  /* a lone surrogate: the reference path says what is wrong */
            PyErr_Clear();
            return NOT_PLAIN;
        }
        put_text(f, o, r, s, len, 1);
        return OK;
    }
    if (PyLong_CheckExact(v)) {
        int got = long_value(v, &x);
        if (got != OK) return got;
        char buf[32];
        put_text(f, o, r, buf, snprintf(buf, sizeof buf, "%lld", x), 0);
        return OK;
    }
    return NOT_PLAIN;
}

/* rows: -1 takes the view's own */
static int get_out(PyObject *obj, Py_buffer *view, Py_ssize_t rows, Py_ssize_t cols, char kind, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_RECORDS) < 0) return -1;
    char f = view->format[0] == '=' || view->format[0] == '<' || view->format[0] == '@' ? view->format[1]
                                                                                        : view->format[0];
    int ok = kind == 'd' ? view->itemsize == 8 && f == 'd'
           : kind == 'i' ? (view->itemsize == 4 || view->itemsize == 8) && strchr("ilq", f) != NULL
           : view->itemsize == 1 && strchr("B?b", f) != NULL;
    if (!ok || view->ndim != 2 || (rows >= 0 && view->shape[0] != rows) || view->shape[1] != cols
        || !PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous 2-d array of %zd columns (%s)", what, cols,
                     kind == 'd' ? "float64" : kind == 'i' ? "int32 or int64" : "uint8 or bool");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_outs(Plan *p, PyObject *ids, PyObject *nums, Py_ssize_t rows, Py_buffer *iv, Py_buffer *nv, Out *o) {
    if (get_out(ids, iv, rows, p->n_ids, 'i', "ids") < 0) return -1;
    if (get_out(nums, nv, iv->shape[0], p->n_numbers, 'd', "numbers") < 0) {
        PyBuffer_Release(iv);
        return -1;
    }
    o->wide = iv->itemsize == 8;
    o->ids = iv->buf;
    o->n_ids = p->n_ids;
    o->nums = (double *)nv->buf;
    o->n_numbers = p->n_numbers;
    o->pending = NULL;
    o->n_pending = 0;
    return 0;
}

static PyObject *outcome_bool(int outcome) {
    if (outcome == FAILED) return NULL;
    if (outcome == OK) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* encode(records, context, ids, numbers, extra) -> bool
 *
 * records: a list or tuple of dicts; context: a dict of the values every record shares (a record's own value
 * wins) or None; ids: int32/int64 [n, n_ids] and numbers: float64 [n, n_numbers], written in place; extra: None
 * (keys that name no field are ignored) or a tuple of the other keys a record may hold.
 * Returns True when every record was plain and the outputs are complete, False otherwise (the outputs are then
 * partly written and meaningless).
 */
#define KEY_CACHE 256
enum { UNKNOWN = -1, ALLOWED = -2 };  /* a key that names no field: refused, or allowed (extra / ignored) */

/* The field a record key names (UNKNOWN or ALLOWED otherwise). Records from one source share their key objects
 * and order, so the answer for the key at position m is cached by its address: every record of the call holds its
 * keys, so no address is reused for another key during the call. */
static int key_field(Plan *p, PyObject *key, Py_ssize_t m, PyObject *extra, PyObject **cache_key,
                     Py_ssize_t *cache_field, Py_ssize_t *field) {
    if (m < KEY_CACHE && cache_key[m] == key) {
        *field = cache_field[m];
        return OK;
    }
    if (!PyUnicode_CheckExact(key)) return NOT_PLAIN;  /* a subclass's __eq__ could run Python code */
    *field = UNKNOWN;
    for (Py_ssize_t i = 0; i < p->n_fields; i++) {
        int eq = p->fields[i].name == key ? 1 : PyUnicode_Compare(p->fields[i].name, key) == 0;
        if (eq) {
            *field = i;
            break;
        }
    }
    if (*field == UNKNOWN) {
        int allowed = extra == Py_None ? 1 : PySequence_Contains(extra, key);
        if (allowed < 0) return FAILED;
        *field = allowed ? ALLOWED : UNKNOWN;
    }
    if (m < KEY_CACHE) {
        cache_key[m] = key;
        cache_field[m] = *field;
    }
    return OK;
}

/* encode(records, context, ids, numbers, extra) -> bool
 *
 * records: a list or tuple of dicts; context: a dict of the values every record shares (a record's own value
 * wins) or None; ids: int32/int64 [n, n_ids] and numbers: float64 [n, n_numbers], written in place; extra: None
 * (keys that name no field are ignored) or a tuple of the other keys a record may hold.
 * Returns True when every record was plain and the outputs are complete, False otherwise (the outputs are then
 * partly written and meaningless).
 */
static PyObject *plan_encode(Plan *p, PyObject *args) {
    PyObject *records, *context, *ids_obj, *num_obj, *extra;
    if (!PyArg_ParseTuple(args, "OOOOO", &records, &context, &ids_obj, &num_obj, &extra)) return NULL;
    if (!PyList_CheckExact(records) && !PyTuple_CheckExact(records)) Py_RETURN_FALSE;
    if (context != Py_None && !PyDict_CheckExact(context)) Py_RETURN_FALSE;
    if (extra != Py_None && !PyTuple_CheckExact(extra)) {
        PyErr_SetString(PyExc_TypeError, "extra must be None or a tuple of names");
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    Py_buffer iv, nv;
    Out o;
    if (get_outs(p, ids_obj, num_obj, n, &iv, &nv, &o) < 0) return NULL;
    int outcome = OK;
    PyObject *cache_key[KEY_CACHE] = {NULL};
    Py_ssize_t cache_field[KEY_CACHE];
    unsigned char *seen = PyMem_Malloc((size_t)p->n_fields + 1);
    o.pending = PyMem_Malloc(sizeof(Lookup) * (size_t)(p->n_fields + 1));
    if (o.pending == NULL || seen == NULL) outcome = FAILED;
    for (Py_ssize_t r = 0; r < n && outcome == OK; r++) {
        PyObject *rec = items[r], *key, *v;
        if (!PyDict_CheckExact(rec)) {
            outcome = NOT_PLAIN;
            break;
        }
        memset(seen, 0, (size_t)p->n_fields);
        Py_ssize_t pos = 0, m = 0, own = 0, field;
        while (outcome == OK && PyDict_Next(rec, &pos, &key, &v)) {  /* the record's keys, in its own order */
            outcome = key_field(p, key, m++, extra, cache_key, cache_field, &field);
            if (outcome != OK || field == ALLOWED) continue;
            if (field == UNKNOWN) {
                outcome = NOT_PLAIN;
                break;
            }
            seen[field] = 1;
            own++;
            outcome = put_object(&p->fields[field], &o, r, v);
        }
        for (Py_ssize_t i = 0; own < p->n_fields && i < p->n_fields && outcome == OK; i++) {
            if (seen[i]) continue;  /* the fields the record lacks: from the context */
            if (context == Py_None || (v = PyDict_GetItemWithError(context, p->fields[i].name)) == NULL)
                outcome = PyErr_Occurred() ? FAILED : NOT_PLAIN;
            else
                outcome = put_object(&p->fields[i], &o, r, v);
        }
        flush(&o);
    }
    PyMem_Free(seen);
    PyMem_Free(o.pending);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&nv);
    if (outcome == FAILED && !PyErr_Occurred()) PyErr_NoMemory();
    return outcome_bool(outcome);
}

/* ---------------------------------------------------------------- JSON */

static inline const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

/* Well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF), as a JSON parser demands. */
static int utf8_valid(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int k;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return 0;
        }
        if (n - i <= k || s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (int j = 2; j <= k; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += k + 1;
    }
    return 1;
}

/* A JSON key at p (*p == '"') with no escape: its bytes in [*s, *s + *len); returns the position after it, or
 * NULL (an escape, a control character, bytes that are not UTF-8, or no end: the reference path reads it). */
static const char *plain_string(const char *p, const char *end, const char **s, Py_ssize_t *len) {
    const char *q = p + 1;
    int ascii = 1;
    while (q < end && *q != '"') {
        unsigned char c = (unsigned char)*q;
        if (c == '\\' || c < 0x20) return NULL;
        ascii &= c < 0x80;
        q++;
    }
    if (q >= end || (!ascii && !utf8_valid((const unsigned char *)p + 1, q - p - 1))) return NULL;
    *s = p + 1;
    *len = q - p - 1;
    return q + 1;
}

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Four hex digits -> their value; 0 when one is not a hex digit. */
static int hex4(const char *p, uint32_t *cp) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        v = v * 16 + (uint32_t)d;
    }
    *cp = v;
    return 1;
}

/* A JSON string value at p (*p == '"'): its text's UTF-8 bytes, where escapes (\n, \", \u00e9, surrogate pairs...)
 * are decoded into ``scratch`` (room for the body's length; *stable is then 0: the bytes last until the next
 * string); returns the position after it, or NULL (a control character, bytes that are not UTF-8, an escape a
 * JSON reader refuses, a lone surrogate, or no end: the reference path reads it). */
static const char *json_string(const char *p, const char *end, const char **s, Py_ssize_t *len, char *scratch,
                               int *stable) {
    const char *q = p + 1;
    int ascii = 1, escaped = 0;
    while (q < end && *q != '"') {
        unsigned char c = (unsigned char)*q;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            escaped = 1;
            q += 2;
            continue;
        }
        ascii &= c < 0x80;
        q++;
    }
    if (q >= end || (!ascii && !utf8_valid((const unsigned char *)p + 1, q - p - 1))) return NULL;
    *stable = !escaped;
    if (!escaped) {
        *s = p + 1;
        *len = q - p - 1;
        return q + 1;
    }
    char *o = scratch;
    for (const char *r = p + 1; r < q; r++) {
        if (*r != '\\') {
            *o++ = *r;
            continue;
        }
        switch (*++r) {
            case '"': case '\\': case '/': *o++ = *r; break;
            case 'b': *o++ = '\b'; break;
            case 'f': *o++ = '\f'; break;
            case 'n': *o++ = '\n'; break;
            case 'r': *o++ = '\r'; break;
            case 't': *o++ = '\t'; break;
            case 'u': {
                uint32_t cp, lo;
                if (q - r < 5 || !hex4(r + 1, &cp)) return NULL;
                r += 4;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return NULL;  /* a low surrogate first */
                if (cp >= 0xD800 && cp <= 0xDBFF) {  /* a high surrogate: its pair must follow */
                    if (q - r < 7 || r[1] != '\\' || r[2] != 'u' || !hex4(r + 3, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                        return NULL;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    r += 6;
                }
                if (cp < 0x80) {
                    *o++ = (char)cp;
                } else if (cp < 0x800) {
                    *o++ = (char)(0xC0 | (cp >> 6));
                    *o++ = (char)(0x80 | (cp & 0x3F));
                } else if (cp < 0x10000) {
                    *o++ = (char)(0xE0 | (cp >> 12));
                    *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                    *o++ = (char)(0x80 | (cp & 0x3F));
                } else {
                    *o++ = (char)(0xF0 | (cp >> 18));
                    *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                    *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                    *o++ = (char)(0x80 | (cp & 0x3F));
                }
                break;
            }
            default: return NULL;
        }
    }
    *s = scratch;
    *len = o - scratch;
    return q + 1;
}


/* A JSON number at p: returns its end, or NULL; *is_int: no fraction and no exponent. */
static const char *number_token(const char *p, const char *end, int *is_int) {
    const char *q = p;
    if (q < end && *q == '-') q++;
    if (q >= end || !is_digit(*q)) return NULL;
    if (*q == '0')
        q++;
    else
        while (q < end && is_digit(*q)) q++;
    *is_int = 1;
    if (q < end && *q == '.') {
        q++;
        if (q >= end || !is_digit(*q)) return NULL;
        while (q < end && is_digit(*q)) q++;
        *is_int = 0;
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < end && (*q == '+' || *q == '-')) q++;
        if (q >= end || !is_digit(*q)) return NULL;
        while (q < end && is_digit(*q)) q++;
        *is_int = 0;
    }
    return q;
}

/* An integer token of at most 18 digits (it fits int64 whatever the digits) -> its value. */
static int small_int(const char *p, const char *q, long long *x) {
    int neg = *p == '-';
    if (q - p - neg > 18) return NOT_PLAIN;
    long long v = 0;
    for (const char *c = p + neg; c < q; c++) v = v * 10 + (*c - '0');
    *x = neg ? -v : v;
    return OK;
}

/* A number token -> a finite double, as a JSON reader gives it (ints exactly converted, floats correctly
 * rounded: PyOS_string_to_double is CPython's own, locale-independent). */
static int token_double(const char *p, const char *q, int is_int, double *d) {
    if (is_int) {
        long long x;
        if (small_int(p, q, &x) != OK) return NOT_PLAIN;
        *d = (double)x;
        return OK;
    }
    /* Clinger's fast path: a mantissa below 2^53 and a power of ten up to 1e22 are both exact doubles, so one
     * rounded multiplication or division gives the correctly rounded value */
    static const double pow10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                                   1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    const char *c = p + (*p == '-');
    uint64_t m = 0;
    int digits = 0, exp10 = 0;
    for (; c < q && is_digit(*c); c++, digits++) m = m * 10 + (uint64_t)(*c - '0');
    if (c < q && *c == '.')
        for (c++; c < q && is_digit(*c); c++, digits++, exp10--) m = m * 10 + (uint64_t)(*c - '0');
    if (c == q && digits <= 15 && exp10 >= -22) {  /* no exponent part; 15 digits stay below 2^53 */
        double v = exp10 < 0 ? (double)m / pow10[-exp10] : (double)m;
        *d = *p == '-' ? -v : v;
        return OK;
    }
    char *stop;
    *d = PyOS_string_to_double(p, &stop, NULL);
    if (*d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return NOT_PLAIN;
    }
    return stop == q && isfinite(*d) ? OK : NOT_PLAIN;
}

static inline int literal(const char *p, const char *end, const char *word, Py_ssize_t n) {
    return end - p >= n && memcmp(p, word, (size_t)n) == 0;
}

/* A field's value at p -> its id or number in row r; returns the position after it, or NULL with *st set. */
static const char *put_json(const FieldPlan *f, Out *o, Py_ssize_t r, const char *p, const char *end,
                            char *scratch, int *st) {
    if (p >= end) {
        *st = NOT_PLAIN;
        return NULL;
    }
    if (*p == '"') {
        const char *s;
        Py_ssize_t len;
        int stable;
        const char *q = json_string(p, end, &s, &len, scratch, &stable);
        if (q == NULL || f->kind == NUMBER) {  /* a number given as text: the reference path parses it */
            *st = NOT_PLAIN;
            return NULL;
        }
        put_text(f, o, r, s, len, stable);
        return q;
    }
    if (*p == 'n' && literal(p, end, "null", 4)) {
        *st = put_missing(f, o, r);
        return *st == OK ? p + 4 : NULL;
    }
    int is_int;
    const char *q = number_token(p, end, &is_int);
    if (q == NULL) {  /* true, false, a list or an object */
        *st = NOT_PLAIN;
        return NULL;
    }
    if (f->kind == NUMBER) {
        *st = token_double(p, q, is_int, &o->nums[r * o->n_numbers + f->col]);
        return *st == OK ? q : NULL;
    }
    long long x;
    if (!is_int || small_int(p, q, &x) != OK) {  /* a float category: the reference path formats it */
        *st = NOT_PLAIN;
        return NULL;
    }
    if (x == 0)
        put_text(f, o, r, "0", 1, 1);  /* "-0" is the int 0 */
    else
        put_text(f, o, r, p, q - p, 1);
    return q;
}

/* Skip any JSON value (its syntax is checked later by the JSON reader that parses it): the position after it. */
static const char *skip_value(const char *p, const char *end) {
    if (p >= end) return NULL;
    if (*p == '"') {
        for (const char *q = p + 1; q < end; q++) {
            if (*q == '\\')
                q++;
            else if (*q == '"')
                return q + 1;
        }
        return NULL;
    }
    if (*p == '{' || *p == '[') {
        Py_ssize_t depth = 0;
        for (const char *q = p; q < end; q++) {
            if (*q == '"') {
                q = skip_value(q, end);
                if (q == NULL) return NULL;
                q--;
            } else if (*q == '{' || *q == '[') {
                depth++;
            } else if ((*q == '}' || *q == ']') && --depth == 0) {
                return q + 1;
            }
        }
        return NULL;
    }
    const char *q = p;
    while (q < end && !strchr(",}] \t\r\n", *q)) q++;
    return q > p ? q : NULL;
}

#define MAX_KEYS 4096

/* encode_json(body, key, ids, numbers, extra, extras, missing, spans) -> (n, members) or None
 *
 * body: a JSON object whose member ``key`` is an array of record objects; each record goes to one row of ids
 * and numbers (as encode), its keys named in ``extra`` (a tuple) to ``extras`` [rows, len(extra)] (float64, NaN
 * where absent or null), its fields absent to ``missing`` [rows, n_fields] (uint8 1; the caller fills them from a
 * context: fill_missing), its byte span to ``spans`` [rows, 2] (int64). members: the (start, end) byte spans of
 * the object's other members, for a JSON reader. None when the body is not plain (an escape in a key, a value of
 * another type, a key twice, an unknown key, more records than rows, JSON it cannot read):
 * the reference path then reads it and says what is wrong.
 */
static PyObject *plan_encode_json(Plan *p, PyObject *args) {
    Py_buffer body;
    PyObject *key, *ids_obj, *num_obj, *extra, *ext_obj, *miss_obj, *span_obj;
    if (!PyArg_ParseTuple(args, "y*UOOO!OOO", &body, &key, &ids_obj, &num_obj, &PyTuple_Type, &extra, &ext_obj,
                          &miss_obj, &span_obj))
        return NULL;
    Py_ssize_t n_extra = PyTuple_GET_SIZE(extra), n_keys = p->n_fields + n_extra;
    Py_buffer iv, nv, ev, mv, sv;
    Out o;
    PyObject *result = NULL, *members = NULL;
    const char **names = NULL;
    Py_ssize_t *name_lens = NULL, *guess = NULL;
    unsigned char *seen = NULL;
    char *scratch = NULL;
    int views = 0;
    if (get_outs(p, ids_obj, num_obj, -1, &iv, &nv, &o) < 0) goto done;
    views = 2;
    Py_ssize_t cap = iv.shape[0];
    if (get_out(ext_obj, &ev, cap, n_extra, 'd', "extras") < 0) goto done;
    views = 3;
    if (get_out(miss_obj, &mv, cap, p->n_fields, 'b', "missing") < 0) goto done;
    views = 4;
    if (get_out(span_obj, &sv, cap, 2, 'i', "spans") < 0) goto done;
    views = 5;
    if (sv.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "spans: expected int64");
        goto done;
    }
    Py_ssize_t key_len;
    const char *key_s = PyUnicode_AsUTF8AndSize(key, &key_len);
    names = PyMem_Malloc(sizeof(char *) * (size_t)(n_keys + 1));
    name_lens = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n_keys + 1));
    guess = PyMem_Calloc(MAX_KEYS, sizeof(Py_ssize_t));
    seen = PyMem_Malloc((size_t)n_keys + 1);
    scratch = PyMem_Malloc((size_t)body.len + 1);  /* decoded text is never longer than its escaped form */
    o.pending = PyMem_Malloc(sizeof(Lookup) * (size_t)(p->n_fields + 1));
    members = PyList_New(0);
    if (key_s == NULL || !names || !name_lens || !guess || !seen || !scratch || !o.pending || !members) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n_keys; k++) {
        PyObject *name = k < p->n_fields ? p->fields[k].name : PyTuple_GET_ITEM(extra, k - p->n_fields);
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "extra must hold names");
            goto done;
        }
        names[k] = PyUnicode_AsUTF8AndSize(name, &name_lens[k]);
        if (names[k] == NULL) goto done;
    }
    double *ext = (double *)ev.buf;
    unsigned char *miss = (unsigned char *)mv.buf;
    int64_t *spans = (int64_t *)sv.buf;
    const char *start = (const char *)body.buf, *end = start + body.len, *q = skip_ws(start, end);
    Py_ssize_t n = -1;
    int st = OK;
    if (q >= end || *q != '{') goto not_plain;
    q = skip_ws(q + 1, end);
    while (q < end && *q == '"') {  /* the members of the top-level object, each but the last followed by "," */
        const char *member = q, *s;
        Py_ssize_t len;
        q = plain_string(q, end, &s, &len);
        if (q == NULL) goto not_plain;
        q = skip_ws(q, end);
        if (q >= end || *q != ':') goto not_plain;
        q = skip_ws(q + 1, end);
        if (len != key_len || memcmp(s, key_s, (size_t)len) != 0) {
            q = skip_value(q, end);
            if (q == NULL) goto not_plain;
            PyObject *span = Py_BuildValue("(nn)", (Py_ssize_t)(member - start), (Py_ssize_t)(q - start));
            if (span == NULL || PyList_Append(members, span) < 0) {
                Py_XDECREF(span);
                goto done;
            }
            Py_DECREF(span);
        } else {
            if (n >= 0 || q >= end || *q != '[') goto not_plain;  /* the key twice, or not an array */
            n = 0;
            q = skip_ws(q + 1, end);
            while (q < end && *q == '{') {  /* one record */
                if (n == cap) goto not_plain;
                Py_ssize_t r = n++;
                spans[2 * r] = q - start;
                memset(seen, 0, (size_t)n_keys);
                q = skip_ws(q + 1, end);
                for (Py_ssize_t m = 0; q < end && *q == '"'; m++) {
                    q = plain_string(q, end, &s, &len);
                    if (q == NULL) goto not_plain;
                    Py_ssize_t k = m < MAX_KEYS ? guess[m] : 0;  /* records tend to list their keys in one order */
                    if (name_lens[k] != len || memcmp(names[k], s, (size_t)len) != 0) {
                        for (k = 0; k < n_keys; k++)
                            if (name_lens[k] == len && memcmp(names[k], s, (size_t)len) == 0) break;
                        if (k == n_keys || seen[k]) goto not_plain;  /* an unknown key, or a key twice */
                        if (m < MAX_KEYS) guess[m] = k;
                    } else if (seen[k]) {
                        goto not_plain;
                    }
                    seen[k] = 1;
                    q = skip_ws(q, end);
                    if (q >= end || *q != ':') goto not_plain;
                    q = skip_ws(q + 1, end);
                    if (k < p->n_fields) {
                        q = put_json(&p->fields[k], &o, r, q, end, scratch, &st);
                        if (q == NULL) goto not_plain;
                    } else {
                        double *d = &ext[r * n_extra + (k - p->n_fields)];
                        int is_int;
                        const char *t = q < end && *q == 'n' && literal(q, end, "null", 4) ? q + 4 : NULL;
                        if (t != NULL) {
                            *d = NAN;
                        } else if ((t = number_token(q, end, &is_int)) == NULL
                                   || token_double(q, t, is_int, d) != OK) {
                            goto not_plain;
                        }
                        q = t;
                    }
                    q = skip_ws(q, end);
                    if (q >= end || *q != ',') break;
                    q = skip_ws(q + 1, end);
                    if (q >= end || *q != '"') goto not_plain;
                }
                if (q >= end || *q != '}') goto not_plain;
                q++;
                flush(&o);
                spans[2 * r + 1] = q - start;
                for (Py_ssize_t k = 0; k < n_keys; k++) {
                    if (k < p->n_fields)
                        miss[r * p->n_fields + k] = !seen[k];
                    else if (!seen[k])
                        ext[r * n_extra + (k - p->n_fields)] = NAN;
                }
                q = skip_ws(q, end);
                if (q >= end || *q != ',') break;
                q = skip_ws(q + 1, end);
                if (q >= end || *q != '{') goto not_plain;
            }
            if (q >= end || *q != ']') goto not_plain;
            q++;
        }
        q = skip_ws(q, end);
        if (q >= end || *q != ',') break;
        q = skip_ws(q + 1, end);
        if (q >= end || *q != '"') goto not_plain;
    }
    if (q >= end || *q != '}' || skip_ws(q + 1, end) != end || n < 0) goto not_plain;
    result = Py_BuildValue("(nO)", n, members);
    goto done;
not_plain:
    if (st == FAILED) goto done;
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(members);
    if (views >= 2) PyMem_Free(o.pending);
    PyMem_Free(names);
    PyMem_Free(name_lens);
    PyMem_Free(guess);
    PyMem_Free(seen);
    PyMem_Free(scratch);
    if (views >= 5) PyBuffer_Release(&sv);
    if (views >= 4) PyBuffer_Release(&mv);
    if (views >= 3) PyBuffer_Release(&ev);
    if (views >= 2) {
        PyBuffer_Release(&nv);
        PyBuffer_Release(&iv);
    }
    PyBuffer_Release(&body);
    return result;
}

/* fill_missing(missing, context, ids, numbers) -> bool: the fields ``missing`` marks take the context's value
 * (False when the context lacks one or it is not plain). */
static PyObject *plan_fill_missing(Plan *p, PyObject *args) {
    PyObject *miss_obj, *context, *ids_obj, *num_obj;
    if (!PyArg_ParseTuple(args, "OO!OO", &miss_obj, &PyDict_Type, &context, &ids_obj, &num_obj)) return NULL;
    Py_buffer iv, nv, mv;
    Out o;
    if (get_outs(p, ids_obj, num_obj, -1, &iv, &nv, &o) < 0) return NULL;
    if (get_out(miss_obj, &mv, iv.shape[0], p->n_fields, 'b', "missing") < 0) {
        PyBuffer_Release(&iv);
        PyBuffer_Release(&nv);
        return NULL;
    }
    const unsigned char *miss = (const unsigned char *)mv.buf;
    int outcome = OK;
    for (Py_ssize_t i = 0; i < p->n_fields && outcome == OK; i++) {
        PyObject *v = NULL;
        for (Py_ssize_t r = 0; r < iv.shape[0] && outcome == OK; r++) {
            if (!miss[r * p->n_fields + i]) continue;
            if (v == NULL && (v = PyDict_GetItemWithError(context, p->fields[i].name)) == NULL) {
                outcome = PyErr_Occurred() ? FAILED : NOT_PLAIN;
                break;
            }
            outcome = put_object(&p->fields[i], &o, r, v);
        }
    }
    PyBuffer_Release(&mv);
    PyBuffer_Release(&iv);
    PyBuffer_Release(&nv);
    return outcome_bool(outcome);
}

static PyMethodDef plan_methods[] = {
    {"encode", (PyCFunction)plan_encode, METH_VARARGS,
     "encode(records, context, ids, numbers, extra) -> True when every record was plain and is encoded."},
    {"encode_json", (PyCFunction)plan_encode_json, METH_VARARGS,
     "encode_json(body, key, ids, numbers, extra, extras, missing, spans) -> (n, members), or None when the body "
     "is not plain."},
    {"fill_missing", (PyCFunction)plan_fill_missing, METH_VARARGS,
     "fill_missing(missing, context, ids, numbers) -> True when the context gave every missing field."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ctrkit.data._records.Plan",
    .tp_doc = "How to encode the fields of a record: each field's kind, output column, table and id offset.",
    .tp_basicsize = sizeof(Plan),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = plan_new,
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_methods = plan_methods,
};

/* ---------------------------------------------------------------- module */

static struct PyModuleDef records_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ctrkit.data._records",
    .m_doc = "Raw records -> encoded ids and raw numbers in one compiled pass (the plain case of the reference path).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__records(void) {
    crc_init();
    if (PyType_Ready(&VocabTableType) < 0 || PyType_Ready(&PlanType) < 0) return NULL;
    PyObject *m = PyModule_Create(&records_module);
    if (m == NULL) return NULL;
    Py_INCREF(&VocabTableType);
    Py_INCREF(&PlanType);
    if (PyModule_AddObject(m, "VocabTable", (PyObject *)&VocabTableType) < 0
        || PyModule_AddObject(m, "Plan", (PyObject *)&PlanType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
