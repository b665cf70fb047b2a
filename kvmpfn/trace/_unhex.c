/* kvmpfn.trace._unhex: hex-string integers of trace lines rewritten as JSON numbers, in one pass over a block.
 *
 * unhex(data, depth, keys) -> bytes
 *
 * A JSON string "0x" + 1 to 16 hex digits is replaced by the decimal digits of its value when it is the value
 * of a key in `keys` (a tuple of bytes) in an object nested `depth` containers deep ('{' and '[' counted
 * outside strings), and the byte after its closing quote is ',', '}', ']', whitespace or the end. Everything
 * else is copied unchanged: strings are lexed as JSON lexes them (a backslash escapes the next byte; a raw
 * newline, which JSON forbids in a string, ends one), so the rewrite never makes an invalid document valid
 * and never touches a string inside another string, a key, or a nested value (the "x" and "t" annotations).
 * The output is never longer than the input: 16 hex digits and 4 bytes of "0x and quotes hold 20 decimal
 * digits. kvmpfn/trace/unhex.py is the same function in Python; docs/architecture.md, Compiled modules. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* may follow a value: the next item, the end of its container, whitespace */
static int is_follow(char c) { return c == ',' || c == '}' || c == ']' || is_ws(c); }

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The end of the string whose opening quote is at s[j]: the index after its closing quote, or of the newline
 * or end that cut it short. */
static Py_ssize_t string_end(const char *s, Py_ssize_t n, Py_ssize_t j) {
    Py_ssize_t k = j + 1;
    while (k < n && s[k] != '"' && s[k] != '\n') {
        if (s[k] == '\\' && k + 1 < n && s[k + 1] != '\n') k++;
        k++;
    }
    return k < n && s[k] == '"' ? k + 1 : k;
}

static int is_key(PyObject *keys, const char *key, Py_ssize_t len) {
    Py_ssize_t count = PyTuple_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *k = PyTuple_GET_ITEM(keys, i);
        if (PyBytes_GET_SIZE(k) == len && memcmp(PyBytes_AS_STRING(k), key, len) == 0) return 1;
    }
    return 0;
}

static PyObject *unhex(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t depth;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "y*nO!", &view, &depth, &PyTuple_Type, &keys)) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(keys, i))) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_TypeError, "unhex: keys must be a tuple of bytes");
            return NULL;
        }
    }
    const char *s = view.buf;
    Py_ssize_t n = view.len, i = 0, o = 0, level = 0;
    Py_ssize_t key = -1, key_len = 0; /* the last string followed by ':' */
    char prev = 0;                    /* the last byte outside strings that is not whitespace */
    PyObject *result = PyBytes_FromStringAndSize(NULL, n);
    if (result == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    while (i < n) {
        const char *q = memchr(s + i, '"', n - i);
        Py_ssize_t j = q ? q - s : n;
        for (Py_ssize_t k = i; k < j; k++) {
            char c = s[k];
            if (c == '{' || c == '[') level++;
            else if (c == '}' || c == ']') level--;
            if (!is_ws(c)) prev = c;
        }
        memcpy(out + o, s + i, j - i);
        o += j - i;
        if (j == n) break;
        Py_ssize_t end = string_end(s, n, j);
        if (prev == ':' && level == depth && key >= 0 && end - j >= 5 && end - j <= 20 && s[end - 1] == '"' &&
            s[j + 1] == '0' && s[j + 2] == 'x' && (end == n || is_follow(s[end])) &&
            is_key(keys, s + key, key_len)) {
            unsigned long long value = 0;
            Py_ssize_t k = j + 3;
            for (; k < end - 1; k++) {
                int d = hex_value(s[k]);
                if (d < 0) break;
                value = value << 4 | (unsigned long long)d;
            }
            if (k == end - 1) {
                char digits[20];
                int m = 0;
                do {
                    digits[m++] = (char)('0' + value % 10);
                    value /= 10;
                } while (value);
                while (m) out[o++] = digits[--m];
                prev = '0';
                i = end;
                continue;
            }
        }
        memcpy(out + o, s + j, end - j);
        o += end - j;
        /* a key when the next byte that is not whitespace is ':' */
        Py_ssize_t after = end;
        while (after < n && is_ws(s[after])) after++;
        if (after < n && s[after] == ':' && end - j >= 2 && s[end - 1] == '"') {
            key = j + 1;
            key_len = end - j - 2;
        }
        prev = '"';
        i = end;
    }
    PyBuffer_Release(&view);
    if (_PyBytes_Resize(&result, o) < 0) return NULL;
    return result;
}

static PyMethodDef methods[] = {
    {"unhex", unhex, METH_VARARGS, "unhex(data, depth, keys) -> bytes: hex-string integers as JSON numbers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_unhex", NULL, -1, methods};

PyMODINIT_FUNC PyInit__unhex(void) { return PyModule_Create(&module); }
