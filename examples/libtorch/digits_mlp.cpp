// Trains a small MLP on the digits data set (1797 8x8 images, 10 classes)
// with LibTorch, letting lra adapt the learning rate of the wrapped
// optimizer. Exits non-zero when the final training accuracy is below
// --min-accuracy, so the test suite can assert that it learns.
//
//   digits_mlp --data data/digits.csv.gz --optimizer adam --lr 1e-4 --epochs 20 --min-accuracy 0.9
#include <lra_torch.hpp>
#include <torch/torch.h>
#include <zlib.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string data = "data/digits.csv.gz";
  std::string optimizer = "adam";
  double lr = 1e-4;
  int epochs = 20;
  int batch = 64;
  double min_accuracy = 0.0;
  uint64_t seed = 0;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--data") o.data = next();
    else if (a == "--optimizer") o.optimizer = next();
    else if (a == "--lr") o.lr = std::stod(next());
    else if (a == "--epochs") o.epochs = std::stoi(next());
    else if (a == "--batch") o.batch = std::stoi(next());
    else if (a == "--min-accuracy") o.min_accuracy = std::stod(next());
    else if (a == "--seed") o.seed = std::stoull(next());
    else throw std::runtime_error("unknown argument " + a);
  }
  return o;
}

lra::Optimizer optimizer_named(const std::string& name) {
  static const std::map<std::string, lra::Optimizer> names = {
      {"sgd", lra::Optimizer::SGD},         {"momentum", lra::Optimizer::Momentum},
      {"nesterov", lra::Optimizer::Nesterov}, {"adagrad", lra::Optimizer::Adagrad},
      {"rmsprop", lra::Optimizer::RMSprop}, {"adam", lra::Optimizer::Adam},
      {"adamw", lra::Optimizer::AdamW}};
  auto it = names.find(name);
  if (it == names.end()) throw std::runtime_error("unknown optimizer " + name);
  return it->second;
}

// Reads the gzip CSV: 64 pixel values in 0..16, then the label, per row.
std::pair<torch::Tensor, torch::Tensor> load_digits(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<float> pixels;
  std::vector<int64_t> labels;
  char line[4096];
  while (gzgets(f, line, sizeof line)) {
    std::stringstream row(line);
    std::string cell;
    std::vector<float> values;
    while (std::getline(row, cell, ',')) values.push_back(std::stof(cell));
    if (values.empty()) continue;
    if (values.size() != 65) {
      gzclose(f);
      throw std::runtime_error(path + ": a row has " + std::to_string(values.size()) +
                               " columns, expected 65");
    }
    for (int j = 0; j < 64; ++j) pixels.push_back(values[j] / 16.0f);
    labels.push_back(static_cast<int64_t>(values[64]));
  }
  gzclose(f);
  const auto n = static_cast<int64_t>(labels.size());
  return {torch::from_blob(pixels.data(), {n, 64}).clone(),
          torch::from_blob(labels.data(), {n}, torch::kLong).clone()};
}

struct MLPImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  MLPImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(64, 64));
    fc2 = register_module("fc2", torch::nn::Linear(64, 10));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
};
TORCH_MODULE(MLP);

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  torch::manual_seed(o.seed);
  torch::set_num_threads(1);
  auto [x, y] = load_digits(o.data);
  const int64_t n = x.size(0);

  MLP model;
  lra_config cfg = lra::config(optimizer_named(o.optimizer), o.lr);
  cfg.num_threads = 1;
  lra::TorchOptimizer opt(model->parameters(), cfg);

  std::cout << "digits: " << n << " rows, " << o.optimizer << " from lr " << o.lr << "\n";
  double accuracy = 0.0;
  for (int epoch = 1; epoch <= o.epochs; ++epoch) {
    const auto perm = torch::randperm(n);
    double loss_sum = 0.0;
    std::map<std::string, int> decisions;
    for (int64_t start = 0; start < n; start += o.batch) {
      const auto idx = perm.slice(0, start, std::min<int64_t>(start + o.batch, n));
      const auto xb = x.index_select(0, idx), yb = y.index_select(0, idx);
      model->zero_grad();
      const auto loss = torch::nn::functional::cross_entropy(model->forward(xb), yb);
      loss.backward();
      opt.step(loss);
      // The same batch, the same (deterministic: no dropout, no BatchNorm) model.
      const auto info = opt.reeval(
          [&] { return torch::nn::functional::cross_entropy(model->forward(xb), yb); });
      if (info) ++decisions[lra::decision_name(*info)];
      loss_sum += loss.item<double>() * static_cast<double>(idx.size(0));
    }
    {
      torch::NoGradGuard no_grad;
      accuracy = model->forward(x).argmax(1).eq(y).to(torch::kDouble).mean().item<double>();
    }
    std::cout << "epoch " << epoch << ": loss " << loss_sum / static_cast<double>(n)
              << ", train accuracy " << accuracy << ", lr " << opt.lr() << " (raised "
              << decisions["raised"] << ", lowered " << decisions["lowered"] << ", kept "
              << decisions["kept"] << ", skipped " << decisions["skipped"] << ")\n";
  }
  const auto c = opt.handle().counters();
  std::cout << "final train accuracy " << accuracy << " after " << c.steps << " steps (" << c.raised
            << " raised, " << c.lowered << " lowered)\n";
  if (accuracy < o.min_accuracy) {
    std::cerr << "FAIL: train accuracy " << accuracy << " < " << o.min_accuracy << "\n";
    return 1;
  }
  return 0;
} catch (const lra::Error& e) {
  std::cerr << "lra error (status " << e.status() << "): " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 2;
}
