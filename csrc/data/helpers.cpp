// Index builders of the GPT data path, compiled at install time as megatron_ds._C_data.
//
// Two loops that are O(corpus) in Python and trivial in C++:
//   build_sample_index_{int32,int64}: where each fixed-length sample starts in the shuffled
//       document stream (a walk over documents);
//   build_blending_indices: which dataset each blended sample comes from (most overdue first).
// megatron_ds/data/sample_index.py and blending.py hold the NumPy versions the tests compare
// against and fall back to when this module is missing.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Sample i reads stream tokens [i * seq_length, i * seq_length + seq_length]; row i of the result
// is (position in document_index, offset in that document) of stream token i * seq_length.
// Positions and offsets are stored as IndexT; stream positions are always accumulated in int64,
// because num_samples * seq_length passes 2^31 long before any single index does.
template <typename IndexT>
py::array_t<IndexT> build_sample_index(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                       py::array_t<int64_t, py::array::c_style | py::array::forcecast> document_index,
                                       int64_t seq_length, int64_t num_samples) {
  if (seq_length < 1 || num_samples < 0) throw std::invalid_argument("seq_length must be >= 1, num_samples >= 0");
  auto size = sizes.unchecked<1>();
  auto doc = document_index.unchecked<1>();
  const int64_t num_docs = doc.shape(0);
  const int64_t num_sizes = size.shape(0);

  py::array_t<IndexT> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.template mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t pos = 0;        // position in document_index
    int64_t offset = 0;     // token offset inside document_index[pos]
    int64_t doc_length = 0;
    auto length_at = [&](int64_t p) -> int64_t {
      int64_t d = doc(p);
      if (d < 0 || d >= num_sizes) throw std::out_of_range("document id " + std::to_string(d) + " out of range");
      return size(d);
    };
    out(0, 0) = 0;
    out(0, 1) = 0;
    for (int64_t i = 1; i <= num_samples; ++i) {
      // Advance seq_length tokens from (pos, offset), skipping over whole documents.
      int64_t remaining = seq_length;
      while (true) {
        if (pos >= num_docs) throw std::out_of_range("document index holds too few tokens for the samples asked");
        doc_length = length_at(pos);
        if (offset + remaining < doc_length) {
          offset += remaining;
          break;
        }
        remaining -= doc_length - offset;
        ++pos;
        offset = 0;
      }
      out(i, 0) = static_cast<IndexT>(pos);
      out(i, 1) = static_cast<IndexT>(offset);
    }
  }
  return result;
}

// For each of num_samples blended samples, the dataset furthest behind its share, and that
// dataset's running sample count. Returns (dataset_index int16, dataset_sample_index int64).
//
// "Furthest behind" is measured in steps: dataset d's (taken_d + 1)-th sample is due at step
// (taken_d + 1) / w_d, and the most overdue (earliest due) one goes next, ties to the lower
// index. Only datasets still short of their share after this step, w_d * (i + 1) > taken_d,
// may go, so none ever runs a whole sample ahead. This earliest-due rule keeps every dataset
// within one sample of w_d * n over every prefix n, for any number of datasets (Tijdeman's
// chairman-assignment bound); comparing raw sample deficits instead can fall further behind
// once four or more datasets are blended.
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_indices(
    py::array_t<double, py::array::c_style | py::array::forcecast> weights, int64_t num_samples) {
  auto w = weights.unchecked<1>();
  const int64_t n = w.shape(0);
  if (n < 1 || n > 32767) throw std::invalid_argument("need between 1 and 32767 datasets");
  py::array_t<int16_t> dataset_index(num_samples);
  py::array_t<int64_t> dataset_sample_index(num_samples);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(n, 0);
    for (int64_t i = 0; i < num_samples; ++i) {
      const double after = static_cast<double>(i + 1);
      int64_t best = -1;
      double best_due = 0.0;
      for (int64_t d = 0; d < n; ++d) {
        if (!(w(d) * after > static_cast<double>(taken[d]))) continue;  // already has its share
        const double due = static_cast<double>(taken[d] + 1) / w(d);
        if (best < 0 || due < best_due) {
          best_due = due;
          best = d;
        }
      }
      if (best < 0) throw std::invalid_argument("blending weights must be non-negative and sum to 1");
      di(i) = static_cast<int16_t>(best);
      dsi(i) = taken[best]++;
    }
  }
  return {dataset_index, dataset_sample_index};
}

}  // namespace

PYBIND11_MODULE(_C_data, m) {
  m.doc() = "megatron-ds dataset index builders (see megatron_ds/data/sample_index.py)";
  m.def("build_sample_index_int32", &build_sample_index<int32_t>, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"),
        "(num_samples + 1, 2) int32 rows of (position in document_index, offset in document)");
  m.def("build_sample_index_int64", &build_sample_index<int64_t>, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"),
        "(num_samples + 1, 2) int64 rows of (position in document_index, offset in document)");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("num_samples"),
        "(dataset_index int16, dataset_sample_index int64): each sample from the dataset furthest behind its weight");
}
