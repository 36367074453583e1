/* Decode only a region of a JPEG with libjpeg-turbo: the rows above the region are entropy-decoded but
 * not transformed (jpeg_skip_scanlines), the columns outside it are neither inverse-transformed nor
 * colour-converted (jpeg_crop_scanline), and decoding stops after the region's last row.
 *
 *   decode_region(data, denominator, x0, y0, x1, y1, out) -> (left, width, rows)
 *
 * `denominator` (1, 2, 4, 8) scales the image by 1/denominator as libjpeg does (output size = ceil(size / d));
 * the region [x0, x1) x [y0, y1) is in those scaled pixels and must lie inside the scaled image. The region's
 * rows are written to `out` (a writable buffer of at least (y1 - y0) * width * 3 bytes) as packed RGB with
 * row stride width * 3, where [left, left + width) is the region's columns widened to libjpeg's block
 * boundary (left <= x0, left + width >= x1). Fast integer IDCT and fast (box) chroma upsampling, as in
 * rtrain.data.decode. Raises ValueError for anything libjpeg refuses or finds corrupt (the caller falls back).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr base;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
    int warnings;
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) {  /* a warning (corrupt data libjpeg could step over): refuse it, the caller decides */
        ErrorManager *err = (ErrorManager *)cinfo->err;
        if (!err->warnings++) (*cinfo->err->format_message)(cinfo, err->message);
    }
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int denominator, x0, y0, x1, y1;
    if (!PyArg_ParseTuple(args, "y*iiiiiw*", &data, &denominator, &x0, &y0, &x1, &y1, &out)) return NULL;

    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    memset(&cinfo, 0, sizeof(cinfo));
    memset(&err, 0, sizeof(err));
    cinfo.err = jpeg_std_error(&err.base);
    err.base.error_exit = on_error;
    err.base.emit_message = on_message;
    const char *problem = NULL;
    JDIMENSION left = 0, width = 0;
    int rows = 0;

    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.escape)) {
        problem = err.message;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&cinfo, TRUE);
        if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE) {
            problem = "not a YCbCr or grayscale JPEG";
        } else if (denominator != 1 && denominator != 2 && denominator != 4 && denominator != 8) {
            problem = "denominator must be 1, 2, 4 or 8";
        } else {
            cinfo.out_color_space = JCS_RGB;
            cinfo.scale_num = 1;
            cinfo.scale_denom = (unsigned int)denominator;
            cinfo.dct_method = JDCT_IFAST;
            cinfo.do_fancy_upsampling = FALSE;
            jpeg_start_decompress(&cinfo);
            if (x0 < 0 || y0 < 0 || x1 > (int)cinfo.output_width || y1 > (int)cinfo.output_height || x0 >= x1 ||
                y0 >= y1) {
                problem = "region outside the scaled image";
            } else {
                left = (JDIMENSION)x0;
                width = (JDIMENSION)(x1 - x0);
                if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &left, &width);
                rows = y1 - y0;
                if ((Py_ssize_t)rows * width * 3 > out.len) {
                    problem = "output buffer too small";
                } else {
                    if (y0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
                    unsigned char *row = (unsigned char *)out.buf;
                    while ((int)cinfo.output_scanline < y1) {
                        JSAMPROW pointer = row;
                        if (jpeg_read_scanlines(&cinfo, &pointer, 1) != 1) {
                            problem = "premature end of data";
                            break;
                        }
                        row += (size_t)width * 3;
                    }
                    if (!problem && err.warnings) problem = err.message;
                }
            }
        }
    }
    jpeg_destroy_decompress(&cinfo);
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (problem) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    return Py_BuildValue("(III)", (unsigned int)left, (unsigned int)width, (unsigned int)rows);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, denominator, x0, y0, x1, y1, out) -> (left, width, rows)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
